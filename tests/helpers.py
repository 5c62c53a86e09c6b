"""Shared builders for the tests: a synthetic Python-like corpus, tiny tokenizers trained on it on the
fly (byte-level BPE, SentencePiece-style BPE with byte fallback, another byte-level BPE, and an ASCII
vocabulary that cannot spell everything), tiny Llama models, and table-based runners.

Everything is deterministic: fixed seeds, no network, no files outside a pytest tmp dir.
"""
from __future__ import annotations

import functools
import hashlib
import random
import struct
from typing import Callable, Optional, Sequence

import torch

from crossdraft.runner import KVCache, Runner

# --------------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------------

_NAMES = ["self", "value", "items", "result", "count", "index", "data", "name", "key", "path",
          "buffer", "node", "parent", "child", "total", "offset", "size", "line", "text", "token",
          "config", "cache", "state", "queue", "item", "other", "left", "right", "head", "tail"]
_FUNCS = ["get", "set", "update", "append", "extend", "join", "split", "strip", "read", "write",
          "parse", "load", "dump", "encode", "decode", "format", "merge", "close", "open", "find"]
_CLASSES = ["Parser", "Reader", "Writer", "Node", "Tree", "Buffer", "Cache", "Queue", "Config",
            "Token", "Lexer", "Stream"]
_WORDS = ["the", "a", "of", "to", "is", "and", "return", "value", "first", "last", "empty", "list",
          "string", "number", "when", "if", "not", "none", "all", "each"]
_RARE = ["é", "ü", "ß", "π", "→", "✓", "中文", "日本", "🙂", "🐍", "ñ", "Ω"]


def _expr(r: random.Random) -> str:
    k = r.randrange(7)
    a, b = r.choice(_NAMES), r.choice(_NAMES)
    if k == 0:
        return f"{a}.{r.choice(_FUNCS)}({b})"
    if k == 1:
        return f"{a} + {r.randrange(100)}"
    if k == 2:
        return f"{a}[{b}]"
    if k == 3:
        return f"len({a}) - 1"
    if k == 4:
        return f"self.{a}"
    if k == 5:
        return f"{r.choice(_FUNCS)}_{a}({b}, {r.randrange(10)})"
    return f'"{r.choice(_WORDS)} {r.choice(_WORDS)}"'


def _statement(r: random.Random, rare: bool) -> str:
    k = r.randrange(8)
    a = r.choice(_NAMES)
    if k == 0:
        return f"{a} = {_expr(r)}"
    if k == 1:
        return f"self.{a} = {a}"
    if k == 2:
        return f"return {_expr(r)}"
    if k == 3:
        return f"{a}.{r.choice(_FUNCS)}({_expr(r)})"
    if k == 4:
        words = " ".join(r.choice(_WORDS) for _ in range(r.randrange(2, 6)))
        if rare and r.random() < 0.3:
            words += " " + r.choice(_RARE)
        return f"# {words}"
    if k == 5:
        return f"if {a} is None:"
    if k == 6:
        return f"for {a} in {r.choice(_NAMES)}:"
    return f"print({_expr(r)})"


def make_document(r: random.Random, rare: bool = True) -> str:
    lines = []
    for _ in range(r.randrange(1, 3)):
        cls = r.choice(_CLASSES)
        lines.append(f"class {cls}:")
        for _ in range(r.randrange(1, 3)):
            fn = r.choice(_FUNCS) + "_" + r.choice(_NAMES)
            args = ", ".join(["self"] + r.sample(_NAMES, r.randrange(0, 3)))
            lines.append(f"    def {fn}({args}):")
            for _ in range(r.randrange(2, 6)):
                ind = "        " + ("    " if r.random() < 0.2 else "")
                lines.append(ind + _statement(r, rare))
            lines.append("")
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def corpus(n: int = 300, seed: int = 0, rare: bool = True) -> tuple:
    r = random.Random(seed)
    return tuple(make_document(r, rare) for _ in range(n))


# --------------------------------------------------------------------------------------------------
# tokenizers (Hugging Face fast tokenizers, trained in a fraction of a second)
# --------------------------------------------------------------------------------------------------

EOT = "<|endoftext|>"


def _hf(tok, **kw):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kw)


@functools.lru_cache(maxsize=None)
def bytelevel_bpe(vocab_size: int = 400, specials: tuple = (EOT,), seed: int = 0):
    """GPT-2 / Llama-3 style: ByteLevel pre-tokenizer and decoder, every byte spellable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(300, seed), tr)
    bos, eos = specials[0], specials[-1]
    return _hf(tok, eos_token=eos, bos_token=bos, unk_token=bos)


@functools.lru_cache(maxsize=None)
def sentencepiece_bpe(vocab_size: int = 450, seed: int = 1, add_bos: bool = False):
    """Llama-2 / Mistral style: Metaspace (a "▁" prepended to the text), BPE with byte fallback
    (`<0xNN>` tokens), a decoder that strips one leading space; specials <unk> <s> </s>.
    add_bos: a post-processor puts <s> first when special tokens are added (Llama-2's prompts)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tr = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, limit_alphabet=60,
                             show_progress=False)
    tok.train_from_iterator(corpus(300, seed), tr)
    d = json.loads(tok.to_str())
    vocab, merges = d["model"]["vocab"], d["model"]["merges"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    new_vocab = {s: i for i, s in enumerate(specials)}
    for i in range(256):
        new_vocab[f"<0x{i:02X}>"] = len(new_vocab)
    for s, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        if s not in new_vocab:
            new_vocab[s] = len(new_vocab)
    tok2 = Tokenizer(models.BPE(vocab=new_vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                fuse_unk=True))
    tok2.add_special_tokens(specials)
    tok2.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok2.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    if add_bos:
        tok2.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                            special_tokens=[("<s>", 1)])
    return _hf(tok2, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.lru_cache(maxsize=None)
def ascii_bpe(vocab_size: int = 160, seed: int = 2):
    """A small vocabulary without byte fallback: Metaspace (no prepended marker) and BPE over an ASCII
    alphabet that also lacks some ASCII characters; anything else is <unk> (it cannot spell it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    docs = [d.replace("#", "") .replace("[", "(").replace("]", ")") for d in corpus(300, seed, rare=False)]
    tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(docs, tr)
    return _hf(tok, eos_token="<eos>", unk_token="<unk>")


# --------------------------------------------------------------------------------------------------
# a chat model: ChatML turns, its end of turn only in generation_config.json
# --------------------------------------------------------------------------------------------------

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@functools.lru_cache(maxsize=None)
def chat_corpus(n: int = 300, seed: int = 4) -> tuple:
    """Conversations of two or three turns: a user's line of code, the assistant's few words, each
    turn closed by <|im_end|>; after the assistant's turn comes the user's next (or the document's end)."""
    r = random.Random(seed)
    docs = []
    for _ in range(n):
        turns = []
        for _ in range(r.randrange(2, 4)):
            answer = " ".join(r.choice(_WORDS[:6]) for _ in range(r.randrange(1, 3)))
            turns.append(f"{IM_START}user\n{_statement(r, False)}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n")
        docs.append("".join(turns))
    return tuple(docs)


@functools.lru_cache(maxsize=None)
def chat_bpe(vocab_size: int = 300, seed: int = 4):
    """Qwen-style: byte-level BPE with <|endoftext|> as the tokenizer's EOS, <|im_start|> and <|im_end|>
    special tokens, and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, IM_START, IM_END],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(chat_corpus(300, seed) + corpus(100, seed), tr)
    return _hf(tok, eos_token=EOT, bos_token=EOT, unk_token=EOT, chat_template=CHATML)


TOKENIZERS = {
    "bpe": lambda: bytelevel_bpe(400, (EOT,), 0),  # the target's
    "spm": lambda: sentencepiece_bpe(450, 1),
    "spm_bos": lambda: sentencepiece_bpe(450, 1, add_bos=True),  # the same, BOS first in prompts
    "bpe_alt": lambda: bytelevel_bpe(300, ("<s>", "</s>"), 3),
    "ascii": lambda: ascii_bpe(160, 2),
    "chat": lambda: chat_bpe(300, 4),
}


@functools.lru_cache(maxsize=None)
def vocab(name: str):
    from crossdraft.vocab import Vocab

    return Vocab.from_hf(TOKENIZERS[name](), name=name)


# --------------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------------

def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               max_pos: int = 256, model_type: str = "llama", bias: bool = False, tie: bool = False,
               bos: Optional[int] = None, eos: Optional[int] = None, **config):
    """A random-weight decoder in float64 (eval mode); `config`: more fields of its config (rope_parameters,
    sliding_window, ...)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
              tie_word_embeddings=tie, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **config)
    if model_type == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    elif model_type == "mistral":
        model = MistralForCausalLM(MistralConfig(**kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(attention_bias=bias, **kw))
    return model.to(torch.float64).eval()


def train_tiny(model, hf_tok, steps: int = 150, seq: int = 48, batch: int = 16, lr: float = 3e-3, seed: int = 0,
               docs=None):
    """A few hundred Adam steps on the synthetic corpus (or `docs`) so that greedy continuations are not
    noise (drafters then agree with the target often enough to exercise the accept path)."""
    eos = hf_tok.eos_token_id
    flat = []
    for doc in docs if docs is not None else corpus(300, 0):
        flat.extend(hf_tok.backend_tokenizer.encode(doc, add_special_tokens=False).ids)
        flat.append(eos)
    data = torch.tensor(flat, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    model.float().train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s: s + seq] for s in starts])
        y = torch.stack([data[s + 1: s + seq + 1] for s in starts])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model.to(torch.float64), float(loss.detach())


# --------------------------------------------------------------------------------------------------
# table-based runners: logits as a pure function of the context
# --------------------------------------------------------------------------------------------------

class TableRunner(Runner):
    """A `Runner` whose next-token logits are a pure function `fn(context tuple) -> [V] float64`.

    A "KV cache" is just the list of ids appended so far (`KVCache.data`), so truncate/extend are
    trivially exact; results are memoised per context. Batches run one sequence at a time."""

    def __init__(self, fn: Callable[[tuple], torch.Tensor], vocab_size: int, max_length: int = 64):
        self.fn = fn
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.pruned_rows = None
        self.device = torch.device("cpu")
        self._memo: dict = {}
        self.calls = 0  # forward passes
        self.bytes_per_token = 8
        self.cache = self.new_cache()

    def logits_at(self, ctx: tuple) -> torch.Tensor:
        r = self._memo.get(ctx)
        if r is None:
            r = self._memo[ctx] = torch.as_tensor(self.fn(ctx), dtype=torch.float64)
        return r

    def new_cache(self):
        return KVCache([], 0)

    @property
    def ctx(self) -> list:
        return self.cache.data[: self.cache.length]

    def _forward(self, ids, last_only, rows):
        ctx = self.cache.data
        del ctx[self.cache.length:]
        self.calls += 1
        out = []
        for t in ids:
            ctx.append(int(t))
            out.append(self.logits_at(tuple(ctx)))
        self.cache.length = len(ctx)
        x = torch.stack(out[-1:] if last_only else out)
        if rows is not None:
            x = x.index_select(-1, rows)
        return x


def hashed_logits(ctx: tuple, vocab_size: int, salt: int, scale: float = 2.0) -> torch.Tensor:
    """Deterministic pseudo-random logits for a context: a pure function of (ctx, salt)."""
    h = hashlib.blake2b(repr((salt, ctx)).encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(struct.unpack("<Q", h)[0] & 0x7FFFFFFFFFFFFFFF)
    return torch.randn(vocab_size, generator=g, dtype=torch.float64) * scale


# --------------------------------------------------------------------------------------------------
# toy tokenizers over a tiny alphabet (Vocab.from_tokens)
# --------------------------------------------------------------------------------------------------

def longest_match_encoder(tokens: Sequence[Optional[str]]) -> Callable[[str], list]:
    """Greedy longest-match left to right: the canonical encoder of a toy vocabulary."""
    pieces = sorted(((t, i) for i, t in enumerate(tokens) if t), key=lambda x: -len(x[0]))

    def encode(text: str) -> list:
        out, i = [], 0
        while i < len(text):
            for t, tid in pieces:
                if text.startswith(t, i):
                    out.append(tid)
                    i += len(t)
                    break
            else:  # a character the vocabulary cannot spell is dropped (like an unknown token)
                i += 1
        return out

    return encode


@functools.lru_cache(maxsize=None)
def chat_model():
    """A tiny Llama trained on `chat_corpus` (about 10 s): greedy, it answers a few words and ends its
    turn with <|im_end|>, then goes on with the user's next turn."""
    hf = chat_bpe()
    model = tiny_llama(len(hf), seed=4, hidden=48, eos=hf.eos_token_id)
    return train_tiny(model, hf, steps=200, seed=4, docs=chat_corpus(300, 4))[0]


def save_chat_model(d, end_of_turn: bool = True):
    """The chat model in directory d; end_of_turn: its generation_config.json also ends generations at
    <|im_end|> (as Qwen's and Llama 3's instruct models do), the tokenizer's EOS being <|endoftext|>."""
    import json
    import os

    hf = chat_bpe()
    chat_model().save_pretrained(d)
    hf.save_pretrained(d)
    if end_of_turn:
        path = os.path.join(d, "generation_config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["eos_token_id"] = [hf.convert_tokens_to_ids(IM_END), hf.eos_token_id]
        with open(path, "w") as f:
            json.dump(cfg, f)
    return d
