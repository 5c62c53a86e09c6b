"""Chat models: the chat template (crossdraft/chat.py) and end of sequence from generation_config.json
(crossdraft/vocab.py), in process and through a verifier's tokenizer files.

The chat model is built on the fly (tests/helpers.py): a ChatML template, <|endoftext|> as the
tokenizer's EOS and <|im_end|> (the end of a turn) only in its generation_config.json, as Qwen's and
Llama 3's instruct models ship. Without reading that file it talks past its turn."""
from __future__ import annotations

import helpers
import pytest

from crossdraft import chat
from crossdraft.bridge import Intersection
from crossdraft.engine import Engine
from crossdraft.errors import FailedPrecondition, InvalidArgument
from crossdraft.sampling import SamplingParams
from crossdraft.vocab import Vocab, generation_eos_ids

MESSAGES = [{"role": "user", "content": "x = len(items) - 1"}]


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {"chat": helpers.save_chat_model(root / "chat"),
            "chat-no-turn-end": helpers.save_chat_model(root / "chat-no-turn-end", end_of_turn=False)}


def test_render_chatml_with_the_generation_prompt():
    tok = helpers.chat_bpe()
    text = chat.render(tok, [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}])
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_writing_bos_loses_it_when_the_encoder_adds_one():
    tok = helpers.chat_bpe()
    saved = tok.chat_template
    try:
        tok.chat_template = "{{ bos_token }}" + saved
        assert chat.render(tok, MESSAGES, bos_in_prompt=False).startswith(tok.bos_token + "<|im_start|>user")
        assert chat.render(tok, MESSAGES, bos_in_prompt=True).startswith("<|im_start|>user")
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty list"), ("hi", "non-empty list"), ([{"content": "x"}], r"messages\[0\].role"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text parts")])
def test_bad_messages_are_refused(messages, match):
    with pytest.raises(InvalidArgument, match=match):
        chat.render(helpers.chat_bpe(), messages)


def test_a_model_without_a_chat_template_is_refused_clearly():
    with pytest.raises(FailedPrecondition, match="no chat template"):
        chat.render(helpers.TOKENIZERS["bpe"](), MESSAGES, model="target")


def test_a_template_that_refuses_the_messages_is_an_invalid_argument():
    tok = helpers.chat_bpe()
    saved = tok.chat_template
    try:
        tok.chat_template = "{{ raise_exception('roles must alternate') }}"
        with pytest.raises(InvalidArgument, match="roles must alternate"):
            chat.render(tok, MESSAGES)
    finally:
        tok.chat_template = saved


def test_eos_from_generation_config(chat_dirs):
    hf = helpers.chat_bpe()
    im_end = hf.convert_tokens_to_ids(helpers.IM_END)
    v = Vocab.load(str(chat_dirs["chat"]))
    assert generation_eos_ids(str(chat_dirs["chat"])) == [im_end, hf.eos_token_id]
    assert v.eos_ids == {im_end, hf.eos_token_id} and v.own_eos_ids == {hf.eos_token_id} and v.eos_id == hf.eos_token_id
    plain = Vocab.load(str(chat_dirs["chat-no-turn-end"]))
    assert plain.eos_ids == {hf.eos_token_id}
    # the fingerprint covers what ends a generation; `same` only needs the same tokens and tokenizer EOS
    assert v.fingerprint() != plain.fingerprint() and v.same_as(plain)


def test_chat_model_stops_at_end_of_turn(chat_dirs):
    """Greedy, the model ends its answer with <|im_end|>: generation_config.json makes that the end;
    without it, the same model talks on into the user's next turn."""
    prompt = chat.render(helpers.chat_bpe(), MESSAGES)
    im_end = helpers.chat_bpe().convert_tokens_to_ids(helpers.IM_END)
    res = Engine.load(str(chat_dirs["chat"]), device="cpu").generate(prompt, 40, SamplingParams(), "none")
    assert res.finish_reason == "eos" and res.ids[-1] == im_end and "user" not in res.text and res.text.strip()
    past = Engine.load(str(chat_dirs["chat-no-turn-end"]), device="cpu").generate(prompt, 40, SamplingParams(), "none")
    assert past.ids[: len(res.ids)] == res.ids and len(past.ids) > len(res.ids) and "user" in past.text


def test_chat_target_with_a_cross_vocabulary_drafter_in_process(chat_dirs, trained_models, tmp_path):
    """slem and tli from a drafter of another vocabulary: the same text as the target alone, ended at
    the end of turn; the drafter's EOS maps to the target's tokenizer EOS (one row for it)."""
    from test_services import save_model

    spm = save_model(trained_models["spm"], "spm", tmp_path / "spm")
    e = Engine.load(str(chat_dirs["chat"]), str(spm), device="cpu")
    prompt = chat.render(helpers.chat_bpe(), MESSAGES)
    ref = e.generate(prompt, 40, SamplingParams(), "none")
    for algorithm, params in (("slem", SamplingParams()), ("tli", SamplingParams())):
        assert e.generate(prompt, 40, params, algorithm).ids == ref.ids
    inter = Intersection(e.drafter_vocab, e.target_vocab)
    assert [t for t in inter.target_list if e.target_vocab.token_bytes[t] is None] == [e.target_vocab.eos_id]
