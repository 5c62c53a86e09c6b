"""The tokenizer bridge: how a drafter with its own vocabulary speaks to the target.

Owns:
- `Intersection` (TLI): the drafter tokens that stand for exactly the bytes of a target token, as
  aligned rows (drafter ids) and target ids; the drafter's LM head is pruned to those rows.
- `TokenTrack`: one tokenizer's own canonical tokenization of a growing text. When text is appended
  only a look-behind window of the last tokens is re-encoded, so merges across the old boundary
  (`sel` + `f.x` -> `self`, `.x`), dropped or prepended leading spaces (SentencePiece) and byte
  fallback keep each side's tokenization canonical at a cost that does not grow with the text.
- `slem_candidates` (SLEM): the target tokens that a drafted string stands for, aligned against the
  committed target ids (which need not be canonical: they are whatever the target generated).

Never: runs a model or decides acceptance. Nothing here can change output: a poor bridge costs
acceptance, never correctness, because the target checks every candidate.
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import FailedPrecondition
from .vocab import Vocab, utf8_complete


class Intersection:
    """V_D ∩ V_T matched by bytes; a drafter's EOS maps to the target's EOS of the same name, else to the
    target's own (`Vocab.eos_id`), each target id at most once (q over the intersection stays 1:1)."""

    def __init__(self, drafter: Vocab, target: Vocab):
        rows, tids = [], []
        by_name = {target.specials.get(t): t for t in target.eos_ids}
        for i, b in enumerate(drafter.token_bytes):
            if b is None:
                j = by_name.get(drafter.specials.get(i), target.eos_id) if i in drafter.eos_ids else None
                if j is not None and j not in tids:
                    rows.append(i)
                    tids.append(j)
                continue
            j = target.by_bytes.get(b) if b else None
            if j is not None:
                rows.append(i)
                tids.append(j)
        if len(rows) < 2:
            raise FailedPrecondition(
                f"the drafter's and the target's vocabularies share {len(rows)} tokens: TLI cannot apply")
        self.rows = torch.tensor(rows, dtype=torch.long)  # [n] drafter ids
        self.target_ids = torch.tensor(tids, dtype=torch.long)  # [n] the target id of each row
        self.target_list = tids
        self.size = len(rows)
        self.drafter_coverage = len(rows) / len(drafter)
        self.target_coverage = len(set(tids)) / len(target)


def _mid_word(prev: Optional[bytes], cur: Optional[bytes]) -> bool:
    return bool(prev) and bool(cur) and (prev[-1:].isalnum() and cur[:1].isalnum())


def window_start(vocab: Vocab, ids: list, window: int) -> int:
    """Index of the first token to re-encode: `window` tokens back, then further back (at most 8
    windows) to a token that starts a word and, for tokenizers that prepend a space marker, starts
    with it. Callers fall back to a longer re-encoding when the window cannot be spelled."""
    tb = vocab.token_bytes
    j = max(0, len(ids) - window)
    floor = max(0, len(ids) - 8 * window)
    while j > floor:
        cur, prev = tb[ids[j]], tb[ids[j - 1]]
        if cur is None or prev is None:
            return j  # a special token is a hard boundary
        if not _mid_word(prev, cur) and (not vocab.prefix or cur.startswith(vocab.prefix)):
            return j
        j -= 1
    return j


class TokenTrack:
    """A tokenizer's canonical tokenization of a growing text, re-encoded over a look-behind window."""

    def __init__(self, vocab: Vocab, window: int = 4):
        self.vocab = vocab
        self.window = window
        self.ids: list = []
        self.ends: list = []  # byte offset where each token ends in `text`
        self.text = bytearray()  # every byte appended so far (appended in place: linear in a long session)
        self.done = 0  # bytes of `text` covered by `ids` (an incomplete character stays out)
        self.exact = True  # ids spell text[:done] exactly

    def reset(self, text: bytes) -> None:
        self.ids, self.ends, self.text, self.done, self.exact = [], [], bytearray(), 0, True
        self.extend(text)

    def extend(self, delta: bytes) -> None:
        self.text += delta
        complete = utf8_complete(self.text)
        if complete <= self.done and self.exact:
            return
        v = self.vocab
        j = window_start(v, self.ids, self.window) if self.exact else 0
        new = None
        if j > 0:
            start = self.ends[j - 1]
            new = _try(v.encode_mid, bytes(self.text[start:complete]))
        if new is None:  # from the start: the encoder's own prefix (SentencePiece's "▁") is allowed
            j, start = 0, 0
            new = _try(v.encode_from_start, bytes(self.text[:complete]))
        self.exact = new is not None
        if new is None:  # the tokenizer cannot spell this text: an approximation is fine for a drafter
            new = list(v.encode_fn(self.text[:complete].decode("utf-8", errors="replace")))
        if j == 0:  # token bytes of a from-start encoding may begin with the encoder's prefix
            start = complete - len(v.bytes_of(new))
        tb = v.token_bytes
        ends, off = self.ends[:j], start
        for t in new:
            off += len(tb[t]) if tb[t] is not None else 0
            ends.append(off)
        self.ids = self.ids[:j] + new
        self.ends = ends
        self.done = complete


def _try(fn, data: bytes):
    try:
        return fn(data)
    except UnicodeDecodeError:
        return None


def slem_candidates(target: Vocab, ids: list, ends: list, text: bytes, draft: bytes, window: int = 4) -> list:
    """Target ids for a drafted string, continuing the committed ids.

    ids/ends/text: the committed target ids, where each ends in `text`, and the committed bytes.
    Re-encodes a look-behind window of the committed text together with the draft; where the window's
    canonical tokens reproduce the committed tail exactly the rest are the candidates (merges across
    the boundary resolved canonically), otherwise the draft is encoded on its own from the boundary.
    """
    if not draft:
        return []
    j = window_start(target, ids, window)
    start = ends[j - 1] if j > 0 else 0
    seg = bytes(text[start:]) + draft  # (text may be a bytearray: only its tail is copied)
    seg = seg[: utf8_complete(seg)]
    tail = ids[j:]
    enc = _try(target.encode_mid if start > 0 else target.encode_from_start, seg)
    if enc is not None:
        if start == 0 and target.prompt_bos and tail and tail[0] == target.bos_id:
            tail = tail[1:]
        if enc[: len(tail)] == tail and len(enc) > len(tail):
            return enc[len(tail):]
    d = draft[: utf8_complete(draft)]
    return (_try(target.encode_mid, d) if d else None) or []
