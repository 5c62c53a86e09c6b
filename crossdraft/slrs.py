"""SLRS, string-level rejection sampling (Timor et al., ICML 2025, arXiv 2502.05202): the drafter's side.

Owns: the proposal distribution r over the next *target* token that the drafter's distribution over
*strings* induces, computed exactly over a bounded tree of drafter continuations, and the draw of a
candidate (and of the drafter path behind it) from it. docs/slrs.md has the rule and the proof; in short:

- A state is (drafter context C, leftover bytes L): C holds the drafter's tokens so far (its canonical
  tokenization of the committed text, then the drafter tokens behind the candidates drawn this round);
  L the bytes they spell beyond those candidates (a drafter token may straddle a target-token boundary).
- From the root (no new drafter token, string L), a node whose string s is a proper prefix of some target
  token ("extendable") is *expanded*: one drafter forward gives q(d | C, path); each child d with
  probability w(node) q(d) >= tau becomes a node with string s + bytes(d). A node that is not extendable,
  or that the work bound (`budget` expansions per position) leaves unexpanded, is a *leaf*: its candidate
  is `TargetTrie.candidate(s)`, the first token of the target's canonical encoding of s. The children of
  an expanded node below tau form one *tail* leaf per candidate: at the root with L empty each tail token
  d gets the candidate of bytes(d) (a table), elsewhere the candidate of the node's own string s.
  Drafter EOS at an empty string proposes the target's EOS; strings with no candidate are STOP mass.
- r(t) = sum of the masses of the leaves whose candidate is t, over the leaves' total (STOP excluded):
  an explicit sparse distribution, sent exactly like TLI's q, so the verifier's token-level rejection
  rule (`algorithms.verify_rejection`: accept w.p. min(1, p/r), residual norm(max(0, p - r)) over the
  whole target vocabulary, the seeded-draw check) applies unchanged and is exact.
- The draft stops before a position with probability STOP/total (uniform stream SLRS_STOP); otherwise
  t = inverse-CDF draw from r with the round's DRAFT uniform (sampling.draft_uniform), then a leaf among those with candidate
  t (SLRS_LEAF) and, for a tail leaf, its drafter token (SLRS_CHILD). That path and the bytes it spells
  beyond t are the next position's state: the latent on which the next proposal is conditioned.

Never: sees target logits, decides acceptance, imports grpc or redis.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .sampling import SLRS_CHILD, SLRS_LEAF, SLRS_STOP, draft_uniform, sample
from .vocab import Vocab, utf8_complete

DEFAULT_TAU = 0.02  # children of at least this probability (from the position's root) are resolved one by one
DEFAULT_BUDGET = 6  # expansions (drafter forward rows) per candidate position: the work bound


class TargetTrie:
    """What a drafted string means for the target: can it still grow into a longer target token, and
    which target token would stand first for it."""

    def __init__(self, target: Vocab):
        self.vocab = target
        self.inner = set()  # proper prefixes of target token strings (b"" included)
        self.maxlen = 1
        for b in target.token_bytes:
            if b:
                self.maxlen = max(self.maxlen, len(b))
                for n in range(len(b)):
                    self.inner.add(b[:n])
        self.eos = target.eos_id if target.eos_ids else -1
        self._cand: dict = {}

    def extendable(self, s: bytes) -> bool:
        """Some target token is strictly longer than s and starts with it."""
        return s in self.inner

    def candidate(self, s: bytes) -> int:
        """The target token a leaf with string s proposes (-1: none): the first token of the target's
        canonical encoding of s (so `    return` proposes the target's own `   ` and then ` return`), or,
        where the encoder cannot spell s (an incomplete character, an unknown one), the longest target
        token that is a prefix of s."""
        c = self._cand.get(s)
        if c is None:
            c = self._candidate(s)
            if len(self._cand) > 200_000:
                self._cand.clear()
            self._cand[s] = c
        return c

    def _candidate(self, s: bytes) -> int:
        v = self.vocab
        tb = v.token_bytes
        n = utf8_complete(s)
        if n:
            try:
                enc = v.encode_mid(s[:n])
            except (UnicodeDecodeError, ValueError):
                enc = None
            if enc:
                b = tb[enc[0]]
                if b and s.startswith(b):
                    return enc[0]
        for n in range(min(len(s), self.maxlen), 0, -1):
            t = v.by_bytes.get(s[:n])
            if t is not None:
                return t
        return -1


@dataclass
class Leaf:
    w: float  # probability of reaching it from the root (a by_table leaf: computed per candidate)
    cand: int  # its candidate (-1 for a by_table leaf: each of its tokens has its own)
    path: tuple  # drafter ids after the state's context
    s: bytes  # the state's leftover + the bytes of path
    group: Optional[torch.Tensor] = None  # a tail leaf: weights [V_D] of its drafter tokens (the child is drawn from them)
    by_table: bool = False  # the root's tail: token d stands for candidate table[d]


@dataclass
class Proposal:
    """r at one position: the explored tree's leaves and, per target token, their mass."""

    mass: torch.Tensor  # [V_T] float64: probability of the leaves whose candidate is that token (STOP excluded)
    stop: float = 0.0  # mass of strings with no candidate
    leaves: list = field(default_factory=list)
    expansions: int = 0  # drafter forward rows
    hit: bool = False  # the work bound left an extendable node unexpanded

    def support(self) -> tuple:
        """(ids LongTensor [m], r DoubleTensor [m]) in id order: the sparse r the verifier gets."""
        ids = self.mass.nonzero()[:, 0]
        probs = self.mass[ids]
        return ids, probs / probs.sum()


class Explorer:
    """Builds r for a state, for one drafter vocabulary against one target vocabulary."""

    def __init__(self, drafter: Vocab, target: Vocab, tau: float = DEFAULT_TAU, budget: int = DEFAULT_BUDGET):
        if not tau > 0.0:
            raise ValueError("tau must be positive")
        self.drafter, self.target = drafter, target
        self.tau, self.budget = tau, max(0, int(budget))
        self.trie = TargetTrie(target)
        tb = drafter.token_bytes
        V = len(tb)
        # drafter tokens that spell bytes (tail children of a non-empty string draw from these)
        self.plain = torch.tensor([bool(b) for b in tb], dtype=torch.bool)
        # the candidate of each drafter token's own bytes: tail children of the root with no leftover
        table = [-1] * V
        for d, b in enumerate(tb):
            if b:
                table[d] = self.trie.candidate(b)
            elif d in drafter.eos_ids and self.trie.eos >= 0:
                table[d] = self.trie.eos
        self.table = torch.tensor(table, dtype=torch.long)  # [V_D]
        self.table_ok = self.table >= 0
        self.table_idx = self.table.clamp_min(0)
        self.eos = drafter.eos_ids

    def explore(self, leftover: bytes, q_many: Callable[[list], list]) -> Proposal:
        """q_many([path, ...]) -> for each path the drafter's sampling distribution [V_D] (float64)
        after context + path, or None where it cannot be run (the drafter's context is full: that
        node becomes a leaf). Nodes are expanded in batches, most probable first (the drafter runs a
        batch as one tree pass), at most `budget` per call."""
        def program(paths):
            return q_many(paths)
            yield  # (a generator that yields nothing: q_many runs at once)

        it = self.explore_program(leftover, program)
        try:
            while True:
                next(it)
        except StopIteration as done:
            return done.value

    def explore_program(self, leftover: bytes, q_many):
        """`explore` as a program (`crossdraft.scheduler`): q_many(paths) is itself a program whose forward
        steps this one yields, so a drafter service can batch the tree passes of many sessions."""
        out = Proposal(torch.zeros(len(self.target), dtype=torch.float64))
        mass: dict = {}  # candidate -> mass of its explicit leaves (added to out.mass at the end)
        frontier: list = []
        tick = 0

        def settle(path, s, w, hit=False):
            c = self.trie.candidate(s) if s else -1
            if c < 0:
                out.stop += w
            else:
                mass[c] = mass.get(c, 0.0) + w
                out.leaves.append(Leaf(w, c, path, s))
            out.hit |= hit

        def place(path, s, w):
            nonlocal tick
            if self.trie.extendable(s):
                heapq.heappush(frontier, (-w, tick, path, s))  # most probable first
                tick += 1
            else:
                settle(path, s, w)

        place((), leftover, 1.0)
        while frontier:
            room = self.budget - out.expansions
            if room <= 0:  # the work bound: what is left becomes leaves
                while frontier:
                    negw, _, path, s = heapq.heappop(frontier)
                    settle(path, s, -negw, hit=True)
                break
            batch = [heapq.heappop(frontier) for _ in range(min(room, len(frontier)))]
            qs = yield from q_many([node[2] for node in batch])
            for (negw, _, path, s), q in zip(batch, qs):
                w = -negw
                if q is None:
                    settle(path, s, w)
                    continue
                self._expand(out, mass, path, s, w, q, place)
        if mass:
            out.mass.index_add_(0, torch.tensor(list(mass), dtype=torch.long),
                                torch.tensor(list(mass.values()), dtype=torch.float64))
        return out

    def _expand(self, out, mass, path, s, w, q, place):
        """One node with the drafter's q after it: its children become nodes (w q(d) >= tau), leaves
        (drafter EOS, no bytes) or one tail leaf."""
        tb = self.drafter.token_bytes
        tau = self.tau
        out.expansions += 1
        wq = q * w  # [V_D]
        big = wq >= tau
        for d in big.nonzero()[:, 0].tolist():
            wd = float(wq[d])
            b = tb[d]
            if d in self.eos:
                if s == b"" and self.trie.eos >= 0:
                    mass[self.trie.eos] = mass.get(self.trie.eos, 0.0) + wd
                    out.leaves.append(Leaf(wd, self.trie.eos, path + (d,), s))
                else:
                    out.stop += wd
            elif not b:
                out.stop += wd
            else:
                place(path + (d,), s + b, wd)
        tail = ~big & (wq > 0)
        if s == b"":  # (the root, nothing left over) each tail token stands for its own bytes' candidate
            ok = tail & self.table_ok
            weights = torch.where(ok, wq, torch.zeros_like(wq))
            out.mass.index_add_(0, self.table_idx, weights)
            out.leaves.append(Leaf(0.0, -1, path, s, group=weights, by_table=True))
            out.stop += float(wq[tail & ~self.table_ok].sum())
        else:  # the node's own string decides the candidate; the tail token only extends the leftover
            ok = tail & self.plain
            c = self.trie.candidate(s)
            m = float(wq[ok].sum())
            if c >= 0 and m > 0.0:
                mass[c] = mass.get(c, 0.0) + m
                out.leaves.append(Leaf(m, c, path, s, group=torch.where(ok, wq, torch.zeros_like(wq))))
            else:
                out.stop += m
            out.stop += float(wq[tail & ~ok].sum())


def leaves_of(prop: Proposal, t: int, explorer: Explorer) -> tuple:
    """The leaves whose candidate is t: (leaves, their masses, their drafter-token weights or None)."""
    leaves, weights, groups = [], [], []
    for lf in prop.leaves:
        if lf.by_table:
            g = torch.where(explorer.table == t, lf.group, torch.zeros_like(lf.group))
            w = float(g.sum())
            if w > 0.0:
                leaves.append(lf)
                weights.append(w)
                groups.append(g)
        elif lf.cand == t:
            leaves.append(lf)
            weights.append(lf.w)
            groups.append(lf.group)
    return leaves, weights, groups


def next_state(lf: Leaf, t: int, explorer: Explorer) -> Optional[tuple]:
    """(path, leftover) for the next position when leaf lf (not a tail group) stands behind candidate t.

    Where the node before the leaf's last drafter token spells exactly t's bytes (the drafter's token
    boundary is the target's: ` return` then ` x`), the next position starts from that node with no
    leftover, so its proposal is the drafter's whole distribution there rather than one conditioned on
    the token that happened to end the string; otherwise it keeps the leaf's path and leftover."""
    tb = explorer.target.token_bytes[t]
    if lf.s == tb or not lf.path:
        return lf.path, lf.s[len(tb):]
    last = explorer.drafter.token_bytes[lf.path[-1]] or b""
    if lf.s[: len(lf.s) - len(last)] == tb:
        return lf.path[:-1], b""
    return lf.path, lf.s[len(tb):]


def group_state(lf: Leaf, t: int, explorer: Explorer) -> Optional[tuple]:
    """(path, leftover) for a tail group whose node spells exactly t (its tokens are then not needed), else None."""
    if lf.s == explorer.target.token_bytes[t]:
        return lf.path, b""
    return None


def draw(prop: Proposal, ids: torch.Tensor, probs: torch.Tensor, seed: int, start: int, i: int,
         explorer: Explorer) -> Optional[tuple]:
    """None (the draft stops before this position) or (candidate, path, leftover) where path and
    leftover are the next position's state (`next_state`).

    The candidate is `ids[sample(probs, draft_uniform(seed, start, i))]` (the round starting at
    committed length `start`, candidate i), exactly the draw the verifier redoes; the STOP coin, the
    leaf and the tail token use their own streams at this position of this round."""
    total = float(prop.mass.sum())
    if not total > 0.0:
        return None
    if draft_uniform(seed, start, i, SLRS_STOP) * (total + prop.stop) < prop.stop:
        return None
    t = int(ids[sample(probs, draft_uniform(seed, start, i))])
    if explorer.target.token_bytes[t] is None:  # EOS: the draft ends with it
        return t, (), b""
    leaves, weights, groups = leaves_of(prop, t, explorer)
    j = sample(torch.tensor(weights, dtype=torch.float64), draft_uniform(seed, start, i, SLRS_LEAF))
    lf, g = leaves[j], groups[j]
    if g is None:
        return (t,) + next_state(lf, t, explorer)
    st = group_state(lf, t, explorer)
    if st is not None:
        return (t,) + st
    d = sample(g, draft_uniform(seed, start, i, SLRS_CHILD))
    s = lf.s + (explorer.drafter.token_bytes[d] or b"")
    return t, lf.path + (d,), s[len(explorer.target.token_bytes[t]):]
