"""crossdraft.vocab and crossdraft.bridge with real Hugging Face tokenizers trained on the fly:
byte-level BPE (GPT-2 style), SentencePiece-style BPE with byte fallback, another byte-level BPE
with other merges and specials, and a small vocabulary that cannot spell everything."""
from __future__ import annotations

import dataclasses
import random

import pytest

from crossdraft.bridge import Intersection, TokenTrack, slem_candidates, window_start
from crossdraft.errors import FailedPrecondition, ModelLoadError
from crossdraft.vocab import Vocab, utf8_complete
from helpers import TOKENIZERS, corpus, longest_match_encoder, vocab

NAMES = ["bpe", "spm", "spm_bos", "bpe_alt", "ascii"]
EXTRA = ["🙂🐍 emoji", "\t\tx", "   \n\n   ", "très_long_identifiant_àé_et_ü", "=====", "......",
         "1234567890123", "\r\n", "a  b   c", "中文字符", "))))", "~@~", "    ", "x" * 40, "self_self_self"]


def random_texts(seed: int, n: int):
    """Corpus snippets with odd pieces spliced in (emoji, CJK, tabs, runs of spaces, long identifiers)."""
    r = random.Random(seed)
    docs = corpus(300, 9)
    for _ in range(n):
        t = r.choice(docs)[: r.randrange(20, 300)]
        for _ in range(r.randrange(0, 3)):
            pos = r.randrange(len(t) + 1)
            t = t[:pos] + r.choice(EXTRA) + t[pos:]
        yield t


def spellable(v: Vocab, text: str) -> bool:
    return v.bytes_of(v.encode_fn(text)) in (text.encode(), v.prefix + text.encode())


# --------------------------------------------------------------------------------------------------
# Vocab
# --------------------------------------------------------------------------------------------------

def test_token_bytes_normalisation():
    bpe, spm, alt, asc = vocab("bpe"), vocab("spm"), vocab("bpe_alt"), vocab("ascii")
    hf = TOKENIZERS["bpe"]()
    i = hf.convert_tokens_to_ids("Ġself")
    assert bpe.token_bytes[i] == b" self"  # Ġ is a space
    assert bpe.token_bytes[hf.convert_tokens_to_ids("Ċ")] == b"\n"
    assert bpe.token_bytes[hf.convert_tokens_to_ids("Ã")] == b"\xc3"  # a lone byte of a UTF-8 character
    hs = TOKENIZERS["spm"]()
    assert spm.token_bytes[hs.convert_tokens_to_ids("▁self")] == b" self"  # ▁ is a space
    assert spm.token_bytes[hs.convert_tokens_to_ids("▁")] == b" "
    for b in (0x00, 0x0A, 0x41, 0x7E, 0xC3, 0xF0, 0xFF):
        assert spm.token_bytes[hs.convert_tokens_to_ids(f"<0x{b:02X}>")] == bytes([b])  # byte fallback
    # specials stand for no bytes
    assert bpe.token_bytes[0] is None and bpe.eos_ids == {0} and bpe.bos_id == 0
    assert spm.token_bytes[:3] == [None, None, None] and spm.eos_ids == {2} and spm.bos_id == 1
    assert alt.token_bytes[:2] == [None, None] and alt.eos_ids == {1} and alt.bos_id == 0
    assert asc.token_bytes[:2] == [None, None] and asc.eos_ids == {1}
    for name in NAMES:
        v = vocab(name)
        assert len(v) == len(TOKENIZERS[name]())
        assert sum(b is None for b in v.token_bytes) == len(v.specials)


@pytest.mark.parametrize("name", NAMES)
def test_token_bytes_round_trip(name):
    """Concatenated token bytes of an encoding are the text (plus the encoder's own prefix)."""
    v = vocab(name)
    alphabet = {chr(b[0]) for b in v.token_bytes if b is not None and len(b) == 1 and b[0] < 128}
    n = 0
    for text in random_texts(1, 60):
        got = v.bytes_of(v.encode_fn(text))
        if name == "ascii" and not set(text) <= alphabet:
            continue  # characters outside its alphabet are <unk>: see test_unspellable_characters
        assert got in (text.encode(), v.prefix + text.encode()), (name, text)
        n += 1
    assert n >= 10


def test_prefix_detection_and_prompt_bos():
    assert vocab("spm").prefix == b" "  # SentencePiece prepends "▁" to a text
    assert vocab("spm_bos").prefix == b" "
    for name in ("bpe", "bpe_alt", "ascii"):
        assert vocab(name).prefix == b""
    assert vocab("spm_bos").prompt_bos and not vocab("spm").prompt_bos and not vocab("bpe").prompt_bos
    v = vocab("spm_bos")
    assert v.encode_prompt("x = 1")[0] == v.bos_id
    assert v.bytes_of(v.encode_prompt("x = 1")) == b" x = 1"


def test_unspellable_characters():
    v = vocab("ascii")
    assert not spellable(v, "é")
    assert not spellable(v, "# comment")  # '#' is not in its alphabet either
    assert v.encode_mid(b"x = \xc3\xa9") is None
    assert v.encode_from_start("🙂".encode()) is None
    assert v.encode_mid(b"x = 1") is not None
    # byte fallback spells anything
    s = vocab("spm")
    ids = s.encode_mid(" é🙂中".encode())
    assert ids is not None and s.bytes_of(ids) == " é🙂中".encode()


def test_encode_mid_and_from_start():
    spm = vocab("spm")
    assert spm.encode_from_start(b"x = 1") == spm.encode_fn("x = 1")  # the prefix is allowed from the start
    assert spm.bytes_of(spm.encode_from_start(b"x = 1")) == b" x = 1"
    assert spm.bytes_of(spm.encode_mid(b" y = 2")) == b" y = 2"
    for data in (b"y = 2", b"self", b"=2"):  # mid-text without a leading space: exactly these bytes or None
        ids = spm.encode_mid(data)
        assert ids is None or spm.bytes_of(ids) == data
    bpe = vocab("bpe")
    assert bpe.encode_mid(b"f.x") == bpe.encode_fn("f.x")
    with pytest.raises(UnicodeDecodeError):
        bpe.encode_mid(b"\xc3")  # callers cut incomplete characters first (utf8_complete)


def test_fingerprint_and_same_as():
    assert vocab("spm").same_as(vocab("spm_bos"))  # the same tokens; BOS placement is not a token
    assert vocab("spm").fingerprint() == vocab("spm_bos").fingerprint()
    rebuilt = Vocab.from_hf(TOKENIZERS["bpe"](), "again")
    assert rebuilt.same_as(vocab("bpe")) and rebuilt.fingerprint() == vocab("bpe").fingerprint()
    names = ["bpe", "spm", "bpe_alt", "ascii"]
    assert len({vocab(n).fingerprint() for n in names}) == 4
    for a in names:
        for b in names:
            assert vocab(a).same_as(vocab(b)) == (a == b)


def test_wordpiece_is_refused_and_missing_tokenizer_is_a_load_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(FailedPrecondition):
        Vocab.from_hf(PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]"), "wp")
    with pytest.raises(ModelLoadError):
        Vocab.load(str(tmp_path / "nope"))


def test_load_from_a_saved_directory(tmp_path):
    TOKENIZERS["spm"]().save_pretrained(tmp_path / "spm")
    v = Vocab.load(str(tmp_path / "spm"))
    assert v.same_as(vocab("spm")) and v.prefix == b" " and v.eos_ids == {2}


def test_utf8_complete():
    assert utf8_complete(b"") == 0
    assert utf8_complete(b"ab") == 2
    assert utf8_complete(b"a\xc3") == 1
    assert utf8_complete("é".encode()) == 2
    assert utf8_complete("🙂".encode()[:3]) == 0
    assert utf8_complete(b"x" + "🙂".encode()[:2]) == 1
    assert utf8_complete(b"\xff\xfeab") == 4  # invalid bytes elsewhere are left for a strict decode


# --------------------------------------------------------------------------------------------------
# Intersection (TLI)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("drafter", ["bpe", "spm", "bpe_alt", "ascii"])
@pytest.mark.parametrize("target", ["bpe", "spm"])
def test_intersection_matches_by_bytes_and_eos(drafter, target):
    d, t = vocab(drafter), vocab(target)
    inter = Intersection(d, t)
    rows, tids = inter.rows.tolist(), inter.target_list
    assert len(rows) == len(tids) == inter.size == len(set(rows))
    t_eos = min(t.eos_ids)
    for r, j in zip(rows, tids):
        if d.token_bytes[r] is None:
            assert r in d.eos_ids and j == t_eos  # EOS <-> EOS, no other special
        else:
            assert d.token_bytes[r] == t.token_bytes[j]
    # complete: every drafter token whose bytes some target token stands for is in it
    want = {i for i, b in enumerate(d.token_bytes) if b is not None and b in t.by_bytes} | set(d.eos_ids)
    assert set(rows) == want
    assert 0 < inter.target_coverage <= 1 and 0 < inter.drafter_coverage <= 1
    if drafter == target == "bpe":
        assert rows == tids == list(range(len(d)))
        assert inter.target_coverage == 1.0


def test_intersection_of_disjoint_vocabularies_is_refused():
    a = Vocab.from_tokens(["a", "b", None], longest_match_encoder(["a", "b", None]), [2])
    b = Vocab.from_tokens(["x", "y", None], longest_match_encoder(["x", "y", None]), [2])
    with pytest.raises(FailedPrecondition):
        Intersection(a, b)  # only EOS in common


def test_intersection_prefers_the_targets_ordinary_token_over_byte_fallback():
    t = vocab("spm")  # ids 3..258 are <0x00>..<0xFF>
    assert TOKENIZERS["spm"]().convert_ids_to_tokens([3, 258]) == ["<0x00>", "<0xFF>"]
    ordinary = {t.token_bytes[k] for k in range(259, len(t))}
    inter = Intersection(vocab("bpe"), t)
    twins = [j for j in inter.target_list if 3 <= j < 259 and t.token_bytes[j] in ordinary]
    assert not twins, f"{len(twins)} intersection tokens map to a byte-fallback token, e.g. {t.token_bytes[twins[0]]!r}"


# --------------------------------------------------------------------------------------------------
# TokenTrack
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_token_track_stays_canonical_under_random_appends(name):
    """After every append (deltas of 1-8 bytes: mid-word, mid-UTF-8 character) the ids are the
    tokenizer's own encoding of the whole text so far (its complete characters)."""
    v = vocab(name)
    r = random.Random(hash(name) % 1000)
    checks = 0
    for text in random_texts(2, 60):
        data = text.encode()
        track = TokenTrack(v, window=4)
        cut = r.randrange(0, len(data))
        track.reset(data[:cut])
        i = cut
        while i < len(data):
            j = min(len(data), i + r.randrange(1, 9))
            track.extend(data[i:j])
            i = j
            done = utf8_complete(data[:i])
            assert track.text == data[:i] and track.done == done
            want = v.encode_fn(data[:done].decode())
            assert track.ids == want, (name, data[:done][-60:])
            assert len(track.ends) == len(track.ids)
            if track.ids:
                assert track.ends[-1] == done
            if track.exact:
                assert v.bytes_of(track.ids) in (data[:done], v.prefix + data[:done])
            else:
                assert name == "ascii"
            checks += 1
    assert checks > 300


def test_token_track_merges_across_the_boundary():
    v = vocab("bpe")
    track = TokenTrack(v)
    track.reset(b"x = sel")
    assert [v.token_bytes[i] for i in track.ids][-3:] == [b" ", b"se", b"l"]
    track.extend(b"f.x")
    assert track.ids == v.encode_fn("x = self.x")
    assert b" self" in [v.token_bytes[i] for i in track.ids]
    # mid-character: the incomplete character waits for its last bytes
    track.extend("é".encode()[:1])
    assert track.ids == v.encode_fn("x = self.x") and track.done == len(b"x = self.x")
    track.extend("é".encode()[1:])
    assert track.ids == v.encode_fn("x = self.xé")


def test_token_track_sentencepiece_prefix():
    v = vocab("spm")
    track = TokenTrack(v)
    track.reset(b"x = 1")
    assert track.ids == v.encode_fn("x = 1")
    assert v.bytes_of(track.ids) == b" x = 1"  # its own prepended "▁" at the start of the text only
    track.extend(b"\ny = 2")
    assert track.ids == v.encode_fn("x = 1\ny = 2")
    assert v.bytes_of(track.ids) == b" x = 1\ny = 2"
    assert track.ends[-1] == len(track.text)


def test_token_track_cost_does_not_grow_with_the_text():
    """Appending to a long text re-encodes a look-behind window, not the whole text."""
    base = vocab("bpe")
    lengths = []

    def encode(text):
        lengths.append(len(text))
        return base.encode_fn(text)

    v = dataclasses.replace(base, encode_fn=encode)
    long_text = "".join(corpus(300, 9)[:20]).encode()
    assert len(long_text) > 5000
    track = TokenTrack(v)
    track.reset(long_text)
    lengths.clear()
    for piece in (b"    return", b" self", b".value", b"\n", b"x = 1"):
        track.extend(piece)
    assert track.ids == base.encode_fn((long_text + b"    return self.value\nx = 1").decode())
    assert lengths and max(lengths) < 400, lengths


def test_window_start_stops_at_word_and_special_boundaries():
    v = vocab("bpe")
    ids = v.encode_fn("alpha = beta_gamma_delta_epsilon")
    j = window_start(v, ids, 2)
    assert 0 <= j <= len(ids) - 2
    if j > 0:
        prev, cur = v.token_bytes[ids[j - 1]], v.token_bytes[ids[j]]
        assert not (prev[-1:].isalnum() and cur[:1].isalnum())
    ids2 = ids + [0] + v.encode_fn("abc")
    assert window_start(v, ids2, 2) >= len(ids)  # never re-encodes across a special token


# --------------------------------------------------------------------------------------------------
# slem_candidates (SLEM)
# --------------------------------------------------------------------------------------------------

def committed(v: Vocab, ids: list):
    ends, off = [], 0
    for t in ids:
        off += len(v.token_bytes[t]) if v.token_bytes[t] is not None else 0
        ends.append(off)
    return ids, ends, v.bytes_of(ids)


def cands(v: Vocab, ids: list, draft: bytes) -> list:
    ids, ends, text = committed(v, ids)
    return slem_candidates(v, ids, ends, text, draft)


def tb(v, ids):
    return [v.token_bytes[i] for i in ids]


def test_slem_merge_across_the_boundary():
    v = vocab("bpe")
    ids = v.encode_fn("x = sel")  # ... " ", "se", "l": the target committed a non-final "sel"
    c = cands(v, ids, b"f.x")
    assert v.bytes_of(c) == b"f.x"  # they continue the committed ids: "f", ".", "x"
    assert c == v.encode_fn("f.x")
    # when the committed tail is what a re-encoding gives, the draft's tokens are the canonical ones
    ids = v.encode_fn("x = self")
    c = cands(v, ids, b".x = 1")
    assert ids + c == v.encode_fn("x = self.x = 1")
    ids = v.encode_fn("def f(self):\n    return")
    c = cands(v, ids, b" self.value")
    assert ids + c == v.encode_fn("def f(self):\n    return self.value")


def test_slem_sentencepiece_target_dropped_leading_space():
    v = vocab("spm")
    ids = v.encode_prompt("x = 1")  # " x = 1": the prepended "▁" is part of the committed text
    c = cands(v, ids, b"\ny = 2")
    assert v.bytes_of(c) == b"\ny = 2"  # no extra space in front of the draft
    assert ids + c == v.encode_fn("x = 1\ny = 2")
    c = cands(v, ids, b" + 2")
    assert v.bytes_of(c) == b" + 2"
    # a BOS first in the committed ids (Llama-2 prompts)
    vb = vocab("spm_bos")
    ids = vb.encode_prompt("x = 1")
    c = cands(vb, ids, b"\ny = 2")
    assert vb.bytes_of(c) == b"\ny = 2"
    assert ids[1:] + c == vb.encode_fn("x = 1\ny = 2")


def test_slem_byte_fallback_and_incomplete_characters():
    v = vocab("spm")
    ids = v.encode_prompt("s = '")
    c = cands(v, ids, "é🙂'".encode())
    assert v.bytes_of(c) == "é🙂'".encode()
    hf = TOKENIZERS["spm"]()
    assert any(n.startswith("<0x") for n in hf.convert_ids_to_tokens(c))  # spelled with byte tokens
    # a draft cut inside a character: only its complete characters become candidates
    c = cands(v, ids, "é🙂".encode()[:4])
    assert v.bytes_of(c) == "é".encode()
    c = cands(v, ids, "🙂".encode()[:2])
    assert c == []
    # the target is a byte-level BPE whose committed ids end inside a character
    b = vocab("bpe")
    ids = b.encode_fn("s = 'é")[:-1]  # ... "\xc3" committed, "\xa9" not yet
    c = cands(b, ids, b"\xa9'")
    assert b.bytes_of(ids + c) == "s = 'é'".encode()


def test_slem_unspellable_draft_gives_no_or_partial_candidates():
    v = vocab("ascii")
    ids = v.encode_fn("x = ")
    assert cands(v, ids, "é".encode()) == []
    c = cands(v, ids, "1 é".encode())
    assert b"1 ".startswith(v.bytes_of(c)) or v.bytes_of(c) == b""
    assert all(v.token_bytes[i] is not None for i in c)  # never <unk>


def test_slem_empty_draft():
    v = vocab("bpe")
    assert cands(v, v.encode_fn("x = 1"), b"") == []


@pytest.mark.parametrize("name", NAMES)
def test_slem_candidates_always_spell_a_prefix_of_the_draft(name):
    """For committed ids that are canonical, or not (the target generated a token split the
    tokenizer would not make), and drafts cut anywhere (mid-word, mid-character), the candidates
    are ordinary target tokens that spell a prefix of the draft; mostly all of it."""
    v = vocab(name)
    r = random.Random(7)
    total = full = 0
    for text in random_texts(3, 150):
        full_ids = v.encode_prompt(text)
        m = r.randrange(1, len(full_ids) + 1)
        ids = list(full_ids[:m])
        if r.random() < 0.3 and ids and v.token_bytes[ids[-1]]:
            last = v.token_bytes[ids[-1]]  # a non-canonical split of the last committed token
            parts = [v.by_bytes.get(last[k:k + 1]) for k in range(len(last))]
            if len(parts) > 1 and all(p is not None for p in parts):
                ids = ids[:-1] + parts
        ctext = v.bytes_of(ids)
        rest = v.bytes_of(full_ids)[len(ctext):] if v.bytes_of(full_ids).startswith(ctext) else b""
        draft = rest[: r.randrange(0, 40)]
        c = cands(v, ids, draft)
        got = v.bytes_of(c)
        assert draft.startswith(got), (name, ctext[-30:], draft, tb(v, c))
        assert all(0 <= i < len(v) and v.token_bytes[i] is not None for i in c)
        whole = draft[: utf8_complete(draft)]
        try:
            ok = bool(whole) and spellable(v, whole.decode())
        except UnicodeDecodeError:  # the draft starts inside a character the committed ids began
            ok = bool(whole) and spellable(v, (ctext + whole).decode(errors="ignore"))
        if ok:
            total += 1
            full += got == whole
    assert total > 50
    assert full >= 0.9 * total, (full, total)  # measured: 97-100%


# --------------------------------------------------------------------------------------------------
# SLEM end of sequence, through the verifier
# --------------------------------------------------------------------------------------------------

def scripted_target(v: Vocab, prompt_ids: list, script: list):
    """A table runner that greedily writes `script` after the prompt, then EOS."""
    import torch

    from helpers import TableRunner

    eos = min(v.eos_ids)
    n0 = len(prompt_ids)

    def fn(ctx):
        new = list(ctx[n0:])
        nxt = script[len(new)] if new == script[: len(new)] and len(new) < len(script) else eos
        x = torch.zeros(len(v), dtype=torch.float64)
        x[nxt] = 10.0
        return x

    return TableRunner(fn, len(v), 256)


@pytest.mark.parametrize("name", ["bpe", "spm_bos"])
def test_slem_eos_is_a_candidate_only_after_the_whole_draft(name):
    from crossdraft.protocol import TEXT, Proposal
    from crossdraft.sampling import SamplingParams
    from crossdraft.verifier import Verifier

    v = vocab(name)
    prompt = v.encode_prompt("x = 1")
    draft = b"\ny = 2"
    script = v.encode_fn("x = 1\ny = 2")[len(v.encode_fn("x = 1")):]
    assert v.bytes_of(script) == draft
    eos = min(v.eos_ids)

    def run(text, eos_flag):
        ver = Verifier(scripted_target(v, prompt, script), v)
        ver.start(prompt, 32, SamplingParams())
        return ver.verify(Proposal(seq=len(prompt), kind=TEXT, text=text, eos=eos_flag))

    verdict = run(draft, True)  # the drafter drafted its EOS right after the text
    assert verdict.candidates == len(script) + 1 and verdict.accepted == len(script) + 1
    assert verdict.ids == script + [eos] and verdict.finished and verdict.finish_reason == "eos"
    assert verdict.text == draft
    verdict = run(draft, False)  # no EOS drafted: the target's own EOS comes as its token
    assert verdict.candidates == len(script) and verdict.ids == script + [eos] and verdict.finish_reason == "eos"
    verdict = run(draft + "é".encode()[:1], True)  # the text ends inside a character: no EOS candidate
    assert verdict.candidates == len(script)
    verdict = run(draft[:-1], True)  # EOS after a shorter text: a candidate, rejected by the target
    assert verdict.candidates == len(v.encode_mid(draft[:-1]) or []) + 1
    assert verdict.ids[-1] != eos or verdict.accepted < verdict.candidates
    # a stale proposal (drafted after another committed length) verifies nothing
    ver = Verifier(scripted_target(v, prompt, script), v)
    ver.start(prompt, 32, SamplingParams())
    verdict = ver.verify(Proposal(seq=len(prompt) + 1, kind=TEXT, text=draft, eos=True))
    assert verdict.candidates == 0 and verdict.ids == script[:1]
