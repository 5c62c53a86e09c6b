"""What each token of a tokenizer stands for, as bytes, and the tokenizer's canonical encoding of text.

Owns: `Vocab`, the one view of a tokenizer the algorithms use. Tokens are compared across
tokenizers by the bytes they stand for, so the space markers of byte-level BPE (`Ġ`, via GPT-2's
byte-to-unicode table) and of SentencePiece (`▁`) and byte-fallback tokens (`<0xNN>`) all reduce
to plain bytes. Special tokens (BOS, EOS, pad, unk) stand for no bytes: they are matched by role.

A Vocab can wrap a Hugging Face tokenizer (`Vocab.from_hf`) or be built from a token list and an
encode function (`Vocab.from_tokens`), which is how the tests build adversarial tokenizers.

End of sequence: `eos_ids` are every id that ends a generation: the tokenizer's EOS and, with
`Vocab.load`, the `eos_token_id` list of the model's `generation_config.json` (a chat model's end of
turn: Llama 3's `<|eot_id|>`, Qwen's `<|im_end|>`), as Hugging Face's generate() stops. The fingerprint
covers them (a verifier hands `generation_config.json` out with its tokenizer files); `same_as` and
`eos_id` (the one id a drafter's EOS stands for) use the tokenizer's own.

Never: runs a model.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional, Sequence

from .errors import FailedPrecondition, ModelLoadError

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict:
    """Inverse of GPT-2's bytes_to_unicode table: the character a byte-level BPE token uses -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_kinds(hf_tokenizer) -> set:
    """Names of the decoder steps of a fast tokenizer (ByteLevel, Metaspace, Replace, ByteFallback...)."""
    import json

    try:
        spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    except Exception:  # noqa: BLE001 - a slow tokenizer has no backend
        return set()
    kinds = set()

    def walk(d):
        if isinstance(d, dict):
            if "type" in d:
                kinds.add(d["type"])
            for v in d.values():
                walk(v)
        elif isinstance(d, list):
            for v in d:
                walk(v)

    walk(spec.get("decoder"))
    walk(spec.get("pre_tokenizer"))
    model = spec.get("model") or {}
    if model.get("byte_fallback"):
        kinds.add("ByteFallback")
    if model.get("type") == "WordPiece":
        kinds.add("WordPiece")
    return kinds


@dataclass
class Vocab:
    """A tokenizer seen as bytes. `token_bytes[i]` is None for special tokens."""

    token_bytes: list
    encode_fn: Callable[[str], list]
    eos_ids: frozenset
    bos_id: Optional[int] = None
    specials: dict = field(default_factory=dict)  # id -> name, e.g. "<|endoftext|>"
    prompt_bos: bool = False  # whether encoding a prompt puts BOS first
    name: str = ""
    prefix: bytes = b""  # bytes the encoder prepends to a text (SentencePiece's "▁" at the start)
    fallback_ids: frozenset = frozenset()  # byte-fallback tokens (<0xNN>)
    tokenizer_eos_ids: Optional[frozenset] = None  # the tokenizer's own EOS (eos_ids less generation_config's)

    def __post_init__(self):
        # bytes -> the token that stands for them; an ordinary token wins over a byte-fallback one
        # (SentencePiece has both "a" and "<0x61>", and generates the first)
        self.by_bytes = {}
        for i, b in enumerate(self.token_bytes):
            if b is not None and i not in self.fallback_ids and b not in self.by_bytes:
                self.by_bytes[b] = i
        for i in sorted(self.fallback_ids):
            b = self.token_bytes[i]
            if b is not None and b not in self.by_bytes:
                self.by_bytes[b] = i
        self.prefix = self._detect_prefix()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_tokens(cls, tokens: Sequence[Optional[str]], encode_fn, eos_ids, bos_id=None, name="toy",
                    specials=None) -> "Vocab":
        """A vocabulary whose token i stands for the UTF-8 bytes of tokens[i] (None: special)."""
        tb = [None if t is None else t.encode("utf-8") for t in tokens]
        return cls(tb, encode_fn, frozenset(eos_ids), bos_id, dict(specials or {}), False, name)

    @classmethod
    def from_hf(cls, tok, name: str = "") -> "Vocab":
        kinds = _decoder_kinds(tok)
        if "WordPiece" in kinds:
            raise FailedPrecondition(f"tokenizer {name!r} is WordPiece: crossdraft bridges BPE, byte-level BPE and SentencePiece tokenizers")
        byte_level = "ByteLevel" in kinds
        metaspace = "Metaspace" in kinds or "Replace" in kinds
        byte_fallback = "ByteFallback" in kinds
        dec = _byte_decoder()
        special_ids = set(tok.all_special_ids)
        for t in getattr(tok, "added_tokens_decoder", {}).items():
            if getattr(t[1], "special", False):
                special_ids.add(t[0])
        n = len(tok)
        strings = tok.convert_ids_to_tokens(list(range(n)))
        tb, specials, fallback = [], {}, set()
        for i, s in enumerate(strings):
            if i in special_ids or s is None:
                tb.append(None)
                specials[i] = s
                continue
            m = _BYTE_TOKEN.match(s) if byte_fallback else None
            if m:
                tb.append(bytes([int(m.group(1), 16)]))
                fallback.add(i)
            elif byte_level and all(c in dec for c in s):
                tb.append(bytes(dec[c] for c in s))
            elif metaspace:
                tb.append(s.replace("\u2581", " ").encode("utf-8"))
            else:
                tb.append(s.encode("utf-8"))
        eos = tok.eos_token_id
        eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            def encode_fn(text, _b=backend):
                return _b.encode(text, add_special_tokens=False).ids
        else:
            def encode_fn(text, _t=tok):
                return _t.encode(text, add_special_tokens=False)
        with_special = tok.encode("a", add_special_tokens=True)
        prompt_bos = tok.bos_token_id is not None and len(with_special) > 0 and with_special[0] == tok.bos_token_id
        return cls(tb, encode_fn, eos_ids, tok.bos_token_id, specials, prompt_bos, name,
                   fallback_ids=frozenset(fallback))

    @classmethod
    def load(cls, name_or_path: str) -> "Vocab":
        from transformers import AutoTokenizer

        from .runner import check_local, quiet_transformers

        check_local(name_or_path)
        quiet_transformers()
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"cannot load tokenizer {name_or_path!r}: {msg}") from None
        v = cls.from_hf(tok, name=name_or_path)
        v.hf = tok
        v.add_generation_eos(generation_eos_ids(name_or_path))
        return v

    def add_generation_eos(self, ids) -> None:
        """Also end generations at `ids` (generation_config.json's eos_token_id); ids outside the
        vocabulary are ignored."""
        extra = frozenset(i for i in ids if 0 <= i < len(self.token_bytes))
        if self.tokenizer_eos_ids is None:
            self.tokenizer_eos_ids = self.eos_ids
        self.eos_ids = self.tokenizer_eos_ids | extra

    # --- queries ------------------------------------------------------------------------------
    def __len__(self):
        return len(self.token_bytes)

    def _detect_prefix(self) -> bytes:
        """Bytes the encoder adds in front of a text (SentencePiece's prepended "▁"), found by probing."""
        probe = "x = 1"
        got = self.bytes_of(self.encode_fn(probe))
        want = probe.encode()
        if got != want and got.endswith(want):
            return got[: len(got) - len(want)]
        return b""

    def bytes_of(self, ids) -> bytes:
        tb = self.token_bytes
        return b"".join(tb[i] for i in ids if tb[i] is not None)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for b in self.token_bytes:
            h.update(b"\x00" if b is None else b"\x01" + len(b).to_bytes(4, "little") + b)
        h.update(repr(sorted(self.eos_ids)).encode())
        return h.hexdigest()[:16]

    def same_as(self, other: "Vocab") -> bool:
        """The same tokens and the same tokenizer EOS (a drafter may stop at other ids than the target)."""
        return self.token_bytes == other.token_bytes and self.own_eos_ids == other.own_eos_ids

    @property
    def own_eos_ids(self) -> frozenset:
        return self.eos_ids if self.tokenizer_eos_ids is None else self.tokenizer_eos_ids

    @property
    def eos_id(self) -> Optional[int]:
        """The EOS a drafter's EOS is mapped to: the tokenizer's own (a chat tokenizer's end of turn)."""
        own = self.own_eos_ids or self.eos_ids
        return min(own) if own else None

    def encode_prompt(self, text: str) -> list:
        ids = list(self.encode_fn(text))
        return ([self.bos_id] + ids) if self.prompt_bos else ids

    def encode_from_start(self, data: bytes) -> Optional[list]:
        """Canonical ids of a whole text (the encoder's own prefix allowed); None if they do not spell it."""
        ids = list(self.encode_fn(data.decode("utf-8")))
        got = self.bytes_of(ids)
        if got == data or got == self.prefix + data:
            return ids
        return None

    def encode_mid(self, data: bytes) -> Optional[list]:
        """Canonical ids of a piece of text that continues a longer text, or None if the tokenizer
        cannot spell exactly these bytes (lossy normaliser, unknown characters, a prefix it adds)."""
        ids = list(self.encode_fn(data.decode("utf-8")))
        got = self.bytes_of(ids)
        if got == data:
            return ids
        if self.prefix and got == self.prefix + data and ids and self.token_bytes[ids[0]] == self.prefix:
            return ids[1:]  # the encoder's prepended marker stood alone: drop it
        return None


def generation_eos_ids(name_or_path: str) -> list:
    """The `eos_token_id` (an int or a list) of a model's generation_config.json: a directory's file, or a
    Hub id's from the local cache; [] when there is none or it cannot be read."""
    import json
    import os

    d = os.path.expanduser(name_or_path)
    path = os.path.join(d, "generation_config.json")
    if os.path.isdir(d):
        path = path if os.path.isfile(path) else None
    else:
        try:
            from transformers.utils import cached_file

            path = cached_file(name_or_path, "generation_config.json", _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except Exception:  # noqa: BLE001 - no generation config: the tokenizer's EOS only
            path = None
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    eos = [eos] if isinstance(eos, int) else (eos if isinstance(eos, list) else [])
    return [i for i in eos if isinstance(i, int) and not isinstance(i, bool)]


def utf8_complete(data: bytes) -> int:
    """Length of data without an incomplete UTF-8 character at its end (a token may end inside one).
    Invalid bytes elsewhere are left for the caller's strict decode to find."""
    try:
        data.decode("utf-8")
        return len(data)
    except UnicodeDecodeError as e:
        if e.end == len(data) and e.start >= len(data) - 3 and "unexpected end" in e.reason:
            return e.start
        return len(data)
