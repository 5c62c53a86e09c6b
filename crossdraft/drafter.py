"""The drafter: a small model's side of one generation. It guesses; the verifier decides.

Owns: the drafter's KV cache and its view of the committed text, and producing a `Proposal` of k
drafter tokens:
- `same`: the drafter shares the target's vocabulary; it drafts target ids directly.
- `tli`:  the drafter's LM head is pruned to V_D ∩ V_T; it drafts intersection tokens, sends their
          target ids and, under sampling, the exact distribution q' it drew them from (renormalised
          over the intersection, after temperature/top-k/top-p).
- `slem`: the drafter drafts its own tokens and sends the string they spell.
- `slrs`: under sampling, per candidate position the drafter computes r, the distribution over the
          next target token that its distribution over strings induces (summed over its tokenizations,
          over a bounded tree: `slrs.py`, docs/slrs.md), draws the candidate from it and sends r exactly
          like tli's q (the verifier's token-level rejection rule applies unchanged). Greedy, slrs is
          slem (rejection sampling against a one-hot p is exact match).
Its context is its own canonical tokenization of the committed text (`TokenTrack`), updated from
each verdict's text; only the KV past the first changed token is recomputed. The KV cache is the
session's own (`DraftKV`), and drafting is a program of forward steps (`draft(k)`, see
`crossdraft.scheduler`): a drafter service batches the drafting steps of all its sessions into shared
passes, and `propose(k)` runs them alone. A draft depends only on the session's own logits and its
(seed, round, offset) uniforms, never on which sessions shared a pass.

Never: sees target logits, decides acceptance, imports grpc or redis.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from .bridge import Intersection, TokenTrack
from .errors import FailedPrecondition
from .protocol import TEXT, TOKENS, Proposal, Verdict
from .runner import Runner, Step
from .sampling import SamplingParams, draft_uniform, probs_from_logits, sample
from .scheduler import drive
from .slrs import DEFAULT_BUDGET, DEFAULT_TAU, Explorer, draw
from .vocab import Vocab

MODES = ("same", "tli", "slem", "slrs")
ALTERNATIVES = 2  # the default of `Drafter.alternatives` in process and in the drafter service


def _lcp(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftKV:
    """A drafter session's KV cache and the drafter ids whose keys and values it holds, in order: one
    drafter's, or shared by the drafters of one session over one context (`Drafter.share_kv`)."""

    __slots__ = ("ids", "cache")

    def __init__(self, runner: Runner):
        self.ids: list = []
        self.cache = runner.new_cache()


class DraftCosts:
    """What drafting costs with one drafter model, over all its sessions (its forks share it), for the load
    cap (`rounds`, `load.draft_cap`): seconds per context token a draft first brings into its cache (the
    prompt at a session's first draft, the text committed since its last), and per drafted token after
    that. Exponentially weighted; None until measured. Its floats are replaced whole (no lock needed)."""

    WEIGHT = 0.2

    def __init__(self):
        self.catchup_s: Optional[float] = None
        self.step_s: Optional[float] = None

    def note(self, name: str, seconds: float, n: int) -> None:
        if n > 0:
            x, old = seconds / n, getattr(self, name)
            setattr(self, name, x if old is None else old + self.WEIGHT * (x - old))


@dataclass
class _Early:
    """A draft made ahead (`Drafter.draft_ahead`): the context it guessed (drafter ids) and its rows, the
    last of which is not in the cache yet; ended: it ended by itself (EOS, an unsure guess); whole: it was
    not stopped short. seq, after: where the guess is one of target ids (same, tli), the committed length
    and the last committed id it guessed, for a proposal sent before the verdict (`early_proposal`)."""
    ctx: list
    rows: list
    ended: bool
    whole: bool = False
    seq: Optional[int] = None
    after: Optional[int] = None
    alternatives: list = field(default_factory=list)  # to its last row, where it ended unsure


class Drafter:
    def __init__(self, runner: Runner, vocab: Vocab, target_vocab: Vocab, mode: str,
                 draft_top_k: int = 0, window: int = 4, min_confidence: float = 0.0,
                 slrs_tau: float = DEFAULT_TAU, slrs_budget: int = DEFAULT_BUDGET, alternatives: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown drafting mode {mode!r}")
        self.runner, self.vocab, self.target_vocab, self.mode = runner, vocab, target_vocab, mode
        self.draft_top_k = draft_top_k
        self.window = window
        # Stop a draft after a token the drafter itself gave less than this probability (as Hugging
        # Face's assistant_confidence_threshold): an unsure guess is rarely accepted, and every
        # token after it costs a drafter step and a verified position. Depends only on the drafter's
        # logits, so seeded runs stay reproducible.
        self.min_confidence = min_confidence
        # With a greedy draft of target ids (same, tli) that stops at such a guess: this many of the
        # drafter's next guesses there, verified beside it (`Proposal.alternatives`, crossdraft/verifier.py).
        self.alternatives = alternatives
        self._alternatives: list = []  # the draft's, while it runs
        self.inter: Optional[Intersection] = None
        if mode == "same":
            if not vocab.same_as(target_vocab):
                raise FailedPrecondition("algorithm 'same' needs the drafter to share the target's tokenizer; "
                                         "these tokenizers differ (use tli or slem)")
        elif mode == "tli":
            self.inter = Intersection(vocab, target_vocab)
        self.explorer: Optional[Explorer] = None
        if mode == "slrs":
            self.explorer = Explorer(vocab, target_vocab, slrs_tau, slrs_budget)
        # this session's KV cache and the drafter ids in it; drafters of other modes over the same text may
        # share it (`share_kv`)
        self.kv = DraftKV(runner)
        self._behind_ids: list = []  # committed while another drafter ran (`defer`), not yet observed
        self._behind_text = b""
        self._drafted: Optional[list] = None  # the last greedy draft's drafter ids (`draft_ahead`)
        self._early: Optional[_Early] = None  # the draft made ahead (`draft_ahead`), until the next draft
        self.costs = DraftCosts()  # shared with every fork

    @property
    def kv_ids(self) -> list:
        return self.kv.ids

    @kv_ids.setter
    def kv_ids(self, ids: list) -> None:
        self.kv.ids = ids

    def fork(self) -> "Drafter":
        """A drafter for one more session: the intersection, the explorer, the tokenizers and the runner
        shared (read-only, or used under the caller's lock), the session state and KV record its own."""
        d = copy.copy(self)
        d.kv = DraftKV(self.runner)
        d._behind_ids, d._behind_text = [], b""
        d._drafted = d._early = None
        return d

    def share_kv(self, other: "Drafter") -> None:
        """Draft on `other`'s KV cache. tli, slem and slrs with one drafter model run it on the same
        context (the drafter's tokens of the committed text), so a cache one of them filled serves the
        others: when `auto` switches among them, the next one continues where the last left off
        instead of catching up on everything committed since it last drafted. (What one drafted past
        the committed text is cut back, as after any round, by the common prefix with the context.)"""
        if (self.mode == "same") != (other.mode == "same") or self.vocab is not other.vocab:
            raise ValueError("only drafters of one model over the same context can share a KV cache")
        self.kv = other.kv

    # --- session ------------------------------------------------------------------------------
    def start(self, prompt: str, prompt_target_ids: list, params: SamplingParams) -> None:
        self.params = params
        dp = params
        if draft_top_k := self.draft_top_k:
            dp = replace(params, top_k=min(params.top_k, draft_top_k) if params.top_k else draft_top_k)
        self.draft_params = dp
        self.committed = len(prompt_target_ids)  # target positions committed
        self.kv.cache.truncate(0)
        self.kv_ids = []
        self._behind_ids, self._behind_text = [], b""
        self._drafted = self._early = None
        if self.mode == "same":
            self.ctx = list(prompt_target_ids)
        else:
            self.track = TokenTrack(self.vocab, self.window)
            self.track.reset(self.target_vocab.bytes_of(prompt_target_ids))
            self.bos = [self.vocab.bos_id] if self.vocab.prompt_bos else []
            self.ctx = self.bos + self.track.ids

    def observe(self, verdict: Verdict) -> None:
        """Move the context to the committed text; the KV is fixed lazily at the next draft."""
        self._catch_up()
        self._advance(verdict.ids, verdict.text)

    def defer(self, verdict: Verdict) -> None:
        """A verdict on another drafter's round (`auto` switches drafters between rounds): noted only,
        and observed with any others in one go before this drafter's next draft, so that a drafter
        that sits out costs nothing per round."""
        self._behind_ids.extend(verdict.ids)
        self._behind_text += verdict.text

    def _catch_up(self) -> None:
        if self._behind_ids:
            ids, text = self._behind_ids, self._behind_text
            self._behind_ids, self._behind_text = [], b""
            self._advance(ids, text)

    def _advance(self, ids: list, text: bytes) -> None:
        self.committed += len(ids)
        if self.mode == "same":
            self.ctx.extend(ids)
        else:
            self.track.extend(text)
            self.ctx = self.bos + self.track.ids

    # --- drafting -----------------------------------------------------------------------------
    @property
    def exact_match(self) -> bool:
        """Whether what is committed cannot depend on what this drafter drafts: greedy decoding, or slem
        (every committed token is the target's own draw, matched or not). Only then may a round's draft
        length follow the verifier's load (`load.draft_cap`): under token-level rejection sampling (same,
        tli, slrs) the draft shapes which of the target's equally likely outputs a seed gives, and a
        seeded output must not depend on which sessions shared its passes."""
        return self.params.greedy or self.mode == "slem"

    @property
    def room(self) -> int:
        """Positions this session's cache may hold: its reservation under a KV budget, or the context.
        A context that outgrows it drafts nothing more (every round is then the target's own step)."""
        limit = self.kv.cache.limit
        return self.runner.max_length if limit is None else min(limit, self.runner.max_length)

    @property
    def rows(self):
        """The LM head rows this drafter drafts from: tli's intersection, or None (the whole head)."""
        return self.inter.rows if self.mode == "tli" else None

    def pending(self) -> int:
        """About the context tokens the next draft runs before its first guess: the whole prompt at a
        session's first draft, then what was committed since the last (the load cap prices them: `rounds`).
        Counts what is deferred in target tokens, so that asking every round costs no re-tokenization."""
        return len(self.ctx) - self._keep(self.ctx) + len(self._behind_ids)

    def _keep(self, ctx: list) -> int:
        """Cache positions a draft after `ctx` keeps: the common prefix, less the last context token, which
        runs again for its logits."""
        keep = _lcp(self.kv_ids, ctx)
        return keep - 1 if keep == len(ctx) else keep

    def _logits_after(self, ctx: list):
        """Program: the drafter's logits after `ctx`, its cache brought there (only past the common prefix)."""
        keep = self._keep(ctx)
        self.kv.cache.truncate(min(keep, self.kv.cache.length))
        logits = yield Step(self.kv.cache, ctx[keep:], last=True, rows=self.rows)
        self.kv_ids = list(ctx)
        return logits[0]

    def propose(self, k: int) -> Proposal:
        """A draft of at most k drafter tokens, run alone."""
        return drive(self.runner, self.draft(k))

    def draft(self, k: int):
        """Program: a proposal of at most k drafter tokens (fewer at the drafter's EOS or an unsure guess). Its
        first tokens come from the draft made ahead (`draft_ahead`) when that one guessed this context."""
        t0 = time.perf_counter_ns()
        self._catch_up()
        early, self._early, self._drafted = self._early, None, None
        self._alternatives = []
        greedy = self.params.greedy
        text = self.mode == "slem" or (self.mode == "slrs" and greedy)  # greedy slrs is slem
        k = max(0, min(k, self.room - len(self.ctx) - 1))
        if k == 0 or not self.ctx:
            return Proposal(seq=self.committed, kind=TEXT if text else TOKENS)
        if self.mode == "slrs" and not greedy:
            return (yield from self._draft_slrs(k, t0))
        rows, ended = self._from_early(early, k)
        if rows and early.ended and len(rows) == len(early.rows):  # it ended where the draft ahead ended
            self._alternatives = early.alternatives
        catchup_tokens = 0
        if not rows:
            catchup_tokens = len(self.ctx) - self._keep(self.ctx)
            logits = yield from self._logits_after(self.ctx)
        elif not ended and len(rows) < k:  # go on from the early draft's last row (not in the cache yet)
            logits = (yield Step(self.kv.cache, [rows[-1][1]], last=True, rows=self.rows))[0]
            self.kv_ids.append(rows[-1][1])
        catchup_ns = time.perf_counter_ns() - t0
        self.costs.note("catchup_s", catchup_ns / 1e9, catchup_tokens)
        taken = len(rows)
        if not ended and len(rows) < k:
            ended = yield from self._chain(rows, logits, k, text)
        ns = time.perf_counter_ns() - t0
        if not taken:  # (rows drafted ahead were counted there)
            self.costs.note("step_s", (ns - catchup_ns) / 1e9, len(rows) - 1)  # the first came with the catch-up
        eos = rows[-1][1] in self.vocab.eos_ids
        if greedy and not eos:
            self._drafted = [r[1] for r in rows]
        stats = dict(drafted=len(rows), draft_ns=ns, catchup_ns=catchup_ns, catchup_tokens=catchup_tokens,
                     early=taken)
        if text:
            ids = [r[1] for r in (rows[:-1] if eos else rows)]
            return Proposal(seq=self.committed, kind=TEXT, text=self.vocab.bytes_of(ids), eos=eos, **stats)
        inter = self.inter
        tids = [inter.target_list[r[0]] for r in rows] if inter is not None else [r[0] for r in rows]
        return Proposal(seq=self.committed, kind=TOKENS, target_ids=tids, q_ids=None if greedy else [r[2] for r in rows],
                        q_probs=None if greedy else [r[3] for r in rows], alternatives=self._alternatives, **stats)

    def _chain(self, rows: list, logits, k: int, text: bool, stop: Optional[Callable] = None):
        """Program: drafter tokens after `logits` (the drafter's logits after its cache), appended to `rows` as
        (row, drafter id, q's ids, q's probabilities) until there are k, each but the last stepped into the
        cache. Returns True where the draft ended by itself (the drafter's EOS, or a guess less sure than
        `min_confidence`), False at k rows or at stop()."""
        greedy, inter = self.params.greedy, self.inter
        while True:
            q_ids = q_probs = None
            if greedy:
                r = int(logits.argmax())
                conf = float(torch.softmax(logits.float(), -1)[r]) if self.min_confidence > 0 else 1.0
            else:
                q = probs_from_logits(logits[None], self.draft_params)[0]  # [V_D or |∩|]
                r = sample(q, draft_uniform(self.params.seed, self.committed, len(rows)))
                conf = float(q[r])
                if not text:
                    nz = q.nonzero()[:, 0].cpu()  # sparse q, on the CPU: it is what goes on the wire
                    q_ids, q_probs = (inter.target_ids[nz] if inter is not None else nz), q.cpu()[nz]
            d_id = int(inter.rows[r]) if inter is not None else r
            rows.append((r, d_id, q_ids, q_probs))
            if d_id in self.vocab.eos_ids or conf < self.min_confidence:
                if greedy and not text and conf < self.min_confidence:
                    self._alternatives = self._next_guesses(logits, r)
                return True
            if len(rows) >= k or (stop is not None and stop()):
                return False
            logits = (yield Step(self.kv.cache, [d_id], last=True, rows=self.rows))[0]
            self.kv_ids.append(d_id)

    def _next_guesses(self, logits, r: int) -> list:
        """Target ids of the drafter's next `alternatives` guesses after its first, r (a greedy draft that
        stops unsure: crossdraft/verifier.py verifies them beside it)."""
        n = min(self.alternatives, logits.shape[-1] - 1)
        if n <= 0:
            return []
        top = torch.topk(logits, n + 1).indices.tolist()
        inter = self.inter
        return [inter.target_list[i] if inter is not None else i for i in top if i != r][:n]

    # --- drafting ahead -----------------------------------------------------------------------------
    def can_draft_ahead(self) -> bool:
        """Whether `draft_ahead` may run now: the last draft was greedy and did not end at the drafter's EOS."""
        return self._drafted is not None

    def draft_ahead(self, k: int, stop: Callable):
        """Program: while the verifier checks the last draft, the next one, on the guess that the verifier
        accepts every candidate and then commits the drafter's own next token. Its rows are kept for the
        next `draft`, which uses them if the committed text turns out to be the guessed one, in this
        drafter's tokens: the same rows a draft there would give. Greedy only (`can_draft_ahead`), so a
        draft never depends on when the verdict came. Drafts at most k rows; stops at stop(), checked
        between steps. Touches the session only through its cache: run it while the session waits for the
        verdict, and let it end before the verdict is observed."""
        t0 = time.perf_counter_ns()
        d_ids, self._drafted = self._drafted, None
        base = self.ctx + d_ids
        room = self.room - len(base) - 2
        if len(self.kv_ids) != len(base) - 1 or self.kv_ids != base[:-1] or room < 1 or stop():
            return
        logits = (yield Step(self.kv.cache, [d_ids[-1]], last=True, rows=self.rows))[0]
        self.kv_ids.append(d_ids[-1])
        r = int(logits.argmax())
        guess = int(self.inter.rows[r]) if self.inter is not None else r
        if guess in self.vocab.eos_ids or stop():
            return
        logits = (yield Step(self.kv.cache, [guess], last=True, rows=self.rows))[0]
        self.kv_ids.append(guess)
        rows: list = []
        tokens = self.mode in ("same", "tli")  # one drafter token per target token: the length is known
        ended = yield from self._chain(rows, logits, min(k, room), not tokens, stop)
        ns = time.perf_counter_ns() - t0
        self.costs.note("step_s", ns / 1e9, len(rows) + 1)
        self._early = _Early(base + [guess], rows, ended, ended or len(rows) >= min(k, room))
        self._early.alternatives, self._alternatives = self._alternatives, []
        if tokens:
            self._early.seq = self.committed + len(d_ids) + 1
            self._early.after = self.inter.target_list[r] if self.inter is not None else r

    def early_proposal(self) -> Optional[Proposal]:
        """The draft made ahead, whole, as a proposal to send before the verdict it guessed (same and tli: the
        committed length it guessed is known); None where there is none."""
        e = self._early
        if e is None or e.after is None or not e.whole or not e.rows:
            return None
        inter = self.inter
        tids = [inter.target_list[r[0]] for r in e.rows] if inter is not None else [r[0] for r in e.rows]
        return Proposal(seq=e.seq, kind=TOKENS, target_ids=tids, after=e.after, drafted=len(e.rows),
                        early=len(e.rows), alternatives=e.alternatives)

    def adopt_early(self) -> None:
        """The proposal sent ahead (`early_proposal`) guessed right, and its verdict is observed: this drafter
        stands as after drafting it (the next `draft_ahead` follows it), where its context is the one guessed."""
        e, self._early = self._early, None
        if e is not None and self.ctx == e.ctx and e.rows[-1][1] not in self.vocab.eos_ids:
            self._drafted = [r[1] for r in e.rows]

    def _from_early(self, early: Optional["_Early"], k: int) -> tuple:
        """(rows, ended): the first k rows of the draft made ahead, where it guessed this context and the
        cache still holds what it drafted; ([], False) otherwise."""
        if early is None or self.ctx != early.ctx:
            return [], False
        n = len(early.ctx) + len(early.rows) - 1
        if len(self.kv_ids) != n or self.kv_ids[len(early.ctx):] != [r[1] for r in early.rows[:-1]] \
                or self.kv_ids[:len(early.ctx)] != early.ctx:
            return [], False
        if len(early.rows) > k:  # the cache as a draft of k would leave it
            keep = len(early.ctx) + k - 1
            self.kv.cache.truncate(keep)
            del self.kv_ids[keep:]
        if len(early.rows) >= k:
            return early.rows[:k], True
        return list(early.rows), early.ended

    def _tree(self, base: list, tree_ids: list, parents: list):
        """Program: the logits of a token tree after `base` (the cache brought to base first); node by
        node when the tree does not fit after the context."""
        keep = _lcp(self.kv_ids, base)
        cache = self.kv.cache
        cache.truncate(min(keep, cache.length))
        if keep < len(base):
            yield Step(cache, base[keep:], last=True, rows=self.rows)
        self.kv_ids = list(base)
        if len(base) + len(tree_ids) <= self.room:
            return (yield Step(cache, tree_ids, rows=self.rows, parents=parents))
        out = []
        for i in range(len(tree_ids)):
            chain, j = [], i
            while j >= 0:
                chain.append(tree_ids[j])
                j = parents[j]
            cache.truncate(len(base))
            out.append((yield Step(cache, chain[::-1], last=True, rows=self.rows))[0])
        cache.truncate(len(base))
        return torch.stack(out)

    def _draft_slrs(self, k: int, t0: int):
        """Program: up to k candidates, each drawn from its r (see slrs.py); r goes out as the candidate's q."""
        ctx, leftover = list(self.ctx), b""
        seed, pos = self.params.seed, self.committed
        tb = self.target_vocab.token_bytes
        room = self.room - 1
        tids, q_ids, q_probs = [], [], []
        n0 = len(ctx)
        cache: dict = {}  # drafter ids after the round's context -> q: a node explored at one position
        # is often the next position's root (see slrs.next_state); a tree pass also yields its inner nodes
        work = {"rows": 0, "forwards": 0, "fwd_ns": 0, "fallbacks": 0}

        def q_many(paths):
            """Program: q after ctx + path for each path: the ones not cached in one tree pass over ctx[-1]
            and every prefix of those paths."""
            rel = tuple(ctx[n0:])
            todo = [p for p in paths if rel + tuple(p) not in cache and len(ctx) + len(p) <= room]
            if todo:
                f0 = time.perf_counter_ns()
                nodes = {(): 0}
                tree_ids, parents = [ctx[-1]], [-1]
                for p in todo:
                    for n in range(1, len(p) + 1):
                        if p[:n] not in nodes:
                            nodes[p[:n]] = len(tree_ids)
                            tree_ids.append(p[n - 1])
                            parents.append(nodes[p[:n - 1]])
                logits = yield from self._tree(ctx[:-1], tree_ids, parents)
                probs = probs_from_logits(logits, self.draft_params).cpu()  # [nodes, V_D]
                for pre, j in nodes.items():
                    cache.setdefault(rel + pre, probs[j])
                work["rows"] += len(tree_ids)
                work["forwards"] += 1
                work["fwd_ns"] += time.perf_counter_ns() - f0
            return [cache.get(rel + tuple(p)) if len(ctx) + len(p) <= room else None for p in paths]

        for i in range(k):
            prop = yield from self.explorer.explore_program(leftover, q_many)
            work["fallbacks"] += int(prop.hit)
            if not float(prop.mass.sum()) > 0.0:
                break
            ids, probs = prop.support()
            got = draw(prop, ids, probs, seed, pos, i, self.explorer)
            if got is None:
                break
            t, path, leftover = got
            tids.append(t)
            q_ids.append(ids)
            q_probs.append(probs)
            if t in self.target_vocab.eos_ids or tb[t] is None:
                break
            ctx.extend(path)
            if float(probs[int((ids == t).nonzero()[0, 0])]) < self.min_confidence:
                break
        ns = time.perf_counter_ns() - t0
        return Proposal(seq=self.committed, kind=TOKENS, target_ids=tids, q_ids=q_ids, q_probs=q_probs,
                        drafted=work["forwards"], draft_ns=ns, psi_ns=ns, psi_forward_ns=work["fwd_ns"],
                        psi_rows=work["rows"], slrs_fallbacks=work["fallbacks"])
