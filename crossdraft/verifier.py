"""The verifier: the target model's side of one generation. It alone decides what is committed.

Owns: the committed target ids of a session, its KV cache, and turning a `Proposal` into a `Verdict`
with one target forward pass over [last committed token] + candidates. It is the trust boundary: a
proposal can only make a round commit fewer tokens, never different ones.

Alternatives (greedy TOKENS proposals, a runner with `siblings`): other ids the drafter found likely in
the last candidate's place ride in the same pass as siblings of that candidate (`runner.Step.depths`),
each seeing exactly what it sees, so their logits are the bits a chain ending in them would give. Where
every candidate but the last is accepted and the target's own token there is an alternative, that token
is committed as always, its keys and values moved into the chain's place, and the target's token after
it too: one token more than the chain gives, and the same tokens the target alone would produce. Where
the drafter is unsure (its draft stops there) the target's token is its first guess about a third of
the time, and one of its next two another quarter (drafter-bpe8k, the zoo's held-out prompts).

The forward passes are steps of programs (`crossdraft.scheduler`): `prefill()` and `round(proposal)`
yield their `runner.Step`s, so a scheduler can put many sessions' rounds into one batched pass;
`start` and `verify` run them alone (one stream in process). Either way the verdict depends only on
the session's own logits and its (seed, position) uniforms, never on which sessions shared a pass.

Never: drafts, imports grpc or redis, or keeps anything but this session's state.
"""
from __future__ import annotations

import time
from typing import Optional

from .algorithms import verify_greedy, verify_match, verify_rejection
from .bridge import slem_candidates
from .errors import InvalidArgument
from .protocol import MAX_ALTERNATIVES, TEXT, TOKENS, Proposal, Verdict
from .runner import KVCache, Runner, Step
from .sampling import TARGET, SamplingParams, probs_from_logits, sample, uniform
from .scheduler import drive
from .vocab import Vocab

MAX_CANDIDATES = 64  # per round; more is never useful and bounds the work a proposal can ask for


class Verifier:
    def __init__(self, runner: Runner, vocab: Vocab, window: int = 4, cache: Optional[KVCache] = None):
        self.runner = runner
        self.vocab = vocab
        self.window = window
        self.cache = cache if cache is not None else runner.new_cache()

    # --- session ------------------------------------------------------------------------------
    def open(self, prompt_ids: list, max_new_tokens: int, params: SamplingParams) -> None:
        """Check the request against the model and set the session up; `prefill()` then fills the cache."""
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty")
        room = self.runner.max_length - len(prompt_ids)
        if room <= 0:
            raise InvalidArgument(f"the prompt is {len(prompt_ids)} target tokens; the target's context is {self.runner.max_length}")
        if max_new_tokens < 1 or max_new_tokens > room:
            raise InvalidArgument(f"max_new_tokens must be in [1, {room}] for this prompt (context {self.runner.max_length}), got {max_new_tokens}")
        bad = [t for t in prompt_ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise InvalidArgument(f"prompt token id {bad[0]} is outside the target's vocabulary")
        self.params = params
        self.ids = list(prompt_ids)
        self.n_prompt = len(prompt_ids)
        self.max_new = max_new_tokens
        tb = self.vocab.token_bytes
        self.ends, off = [], 0
        for t in self.ids:
            off += len(tb[t]) if tb[t] is not None else 0
            self.ends.append(off)
        self.text = bytearray(self.vocab.bytes_of(self.ids))  # appended in place: linear in a long session
        self.finished = False
        self.finish_reason = ""
        self.cache.truncate(0)

    def resume(self, ids: list, max_new_tokens: int, params: SamplingParams) -> bool:
        """Take the session up again at `ids` (prompt and committed ids) from the state an earlier stream
        left in this verifier: True when they are a prefix of its ids under the same sampling, which then
        ends there, its cache with it (no prefill: what the cache holds is already right); False, and
        nothing changed, otherwise (the caller opens the session anew)."""
        n = len(ids)
        if params != self.params or not 1 < n <= len(self.ids) or self.ids[:n] != list(ids) \
                or self.cache.length < n - 1 or not 1 <= max_new_tokens <= self.runner.max_length - n:
            return False
        del self.ids[n:], self.ends[n:]
        del self.text[self.ends[-1]:]
        self.cache.truncate(n - 1)  # the cache holds every committed position but the last
        self.n_prompt, self.max_new = n, max_new_tokens
        self.finished, self.finish_reason = False, ""
        return True

    def prefill(self):
        """Program: everything but the last committed token into the cache (its logits come with the
        next round); a long prompt may run in chunks (`Step.chunk`)."""
        if len(self.ids) > 1:
            yield Step(self.cache, self.ids[:-1], last=True, chunk=True)

    def start(self, prompt_ids: list, max_new_tokens: int, params: SamplingParams) -> None:
        """`open`, then the prefill run alone."""
        self.open(prompt_ids, max_new_tokens, params)
        drive(self.runner, self.prefill())

    @property
    def new_ids(self) -> list:
        return self.ids[self.n_prompt:]

    @property
    def remaining(self) -> int:
        return self.max_new - (len(self.ids) - self.n_prompt)

    # --- rounds -------------------------------------------------------------------------------
    def step(self) -> Verdict:
        """The target alone: one forward pass, one token."""
        return self.verify(None)

    def verify(self, proposal: "Proposal | None") -> Verdict:
        """A round run alone."""
        return drive(self.runner, self.round(proposal))

    def round(self, proposal: "Proposal | None"):
        """Program: one round. A stale proposal (drafted after another committed length) is a round of
        the target alone; the services answer it earlier, without a pass (`wire.empty_verdict`)."""
        t0 = time.perf_counter_ns()
        seq = len(self.ids)
        cands, bridge_ns = self._candidates(proposal)
        cands = cands[: min(MAX_CANDIDATES, self.remaining - 1)]
        alts = self._alternatives(proposal, cands)
        block = [self.ids[-1]] + cands
        if alts:
            logits = yield Step(self.cache, block + alts, depths=list(range(len(block))) + [len(cands)] * len(alts))
        else:
            logits = yield Step(self.cache, block)  # [n+1, V]
        a, y = self._decide(logits, cands, proposal, seq)
        took = bool(alts) and a == len(cands) - 1 and y in alts
        if took:  # the target's token in the last candidate's place is an alternative: its row goes on
            row = len(block) + alts.index(y)
            self.runner.move(self.cache, seq - 1 + row, seq - 1 + len(cands))
            cands = cands[:-1] + [y]
            a, y = len(cands), int(logits[row].argmax())
        # keep the KV of the last committed token and of the accepted candidates
        self.cache.truncate(seq + a)
        new = self._commit(cands[:a] + [y])
        return Verdict(seq=seq, ids=new, text=self.vocab.bytes_of(new), candidates=len(cands), accepted=a,
                       finished=self.finished, finish_reason=self.finish_reason, alternative=took,
                       verify_ns=time.perf_counter_ns() - t0, bridge_ns=bridge_ns)

    def _alternatives(self, proposal, cands: list) -> list:
        """The proposal's alternatives to its last candidate that this round can verify (module docstring):
        greedy, candidates all kept, a runner that runs siblings; in the vocabulary, distinct, not the
        candidate itself."""
        alts = getattr(proposal, "alternatives", None)
        if not alts or not cands or not self.params.greedy or not self.runner.siblings \
                or proposal.kind != TOKENS or len(cands) != len(proposal.target_ids):
            return []
        V = self.runner.vocab_size
        limit = self.runner.max_length if self.cache.limit is None else min(self.cache.limit, self.runner.max_length)
        room = min(MAX_ALTERNATIVES, limit - self.cache.length - 1 - len(cands))  # (under the session's reservation)
        out = []
        for t in alts[:max(0, room)]:
            if isinstance(t, int) and 0 <= t < V and t != cands[-1] and t not in out:
                out.append(t)
        return out

    def _decide(self, logits, cands: list, proposal, seq: int) -> tuple:
        """(candidates accepted, the target's own token) by the rule that fits the proposal."""
        p = self.params
        if p.greedy:
            return verify_greedy(logits, cands)
        probs = probs_from_logits(logits, p)  # [n+1, V]
        if proposal is not None and proposal.kind == TOKENS and proposal.q_ids is not None:
            return verify_rejection(probs, cands, proposal.q_ids, proposal.q_probs, p.seed, seq)
        if cands:
            return verify_match(probs, cands, p.seed, seq)
        return 0, sample(probs[0], uniform(p.seed, seq, TARGET))

    def _candidates(self, proposal) -> tuple:
        if proposal is None:
            return [], 0
        if proposal.seq != len(self.ids) or (proposal.after is not None and self.ids[-1] != proposal.after):
            return [], 0  # stale: drafted after another committed length, or another last id (drafted ahead)
        if proposal.kind == TOKENS:
            V = self.runner.vocab_size
            ids = list(proposal.target_ids)
            if proposal.q_ids is not None:  # under sampling every candidate needs its q
                ids = ids[: min(len(proposal.q_ids), len(proposal.q_probs or []))]
            for i, t in enumerate(ids):
                if not (isinstance(t, int) and 0 <= t < V):
                    return ids[:i], 0
            return ids, 0
        if proposal.kind == TEXT:
            t0 = time.perf_counter_ns()
            text = proposal.text[: 16 * MAX_CANDIDATES]
            cands = slem_candidates(self.vocab, self.ids, self.ends, self.text, text, self.window)
            if proposal.eos and self.vocab.eos_ids and len(text) == len(proposal.text):
                if self.vocab.bytes_of(cands) == text:
                    cands = cands + [self.vocab.eos_id]
            return cands, time.perf_counter_ns() - t0
        return [], 0

    def _commit(self, new: list) -> list:
        out = []
        tb = self.vocab.token_bytes
        for t in new:
            if self.remaining <= 0:
                break
            self.ids.append(t)
            b = tb[t]
            if b:
                self.text += b
            self.ends.append(len(self.text))
            out.append(t)
            if t in self.vocab.eos_ids:
                self.finished, self.finish_reason = True, "eos"
                break
        if not self.finished and self.remaining <= 0:
            self.finished, self.finish_reason = True, "length"
        return out
