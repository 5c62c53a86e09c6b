"""The messages between a drafter and a verifier, in process and on the wire (crossdraft/wire.py).

Owns: `Proposal` (drafter -> verifier) and `Verdict` (verifier -> drafter). They carry plain Python
values so that the gRPC layer converts them field by field, and they are the only thing the two
sides share: the drafter never sees target logits, the verifier never sees drafter state.

Never: imports torch models, grpc or redis.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

TOKENS = "tokens"  # same, tli: candidates are target ids, with q under sampling
TEXT = "text"  # slem: candidates are a string the verifier re-tokenizes

# Target steps (empty proposals, one token each) a session keeps in flight on a Verify stream: the
# drafter service's (crossdraft/rounds.py) and the gateway's for the target alone. Each commits exactly one
# token, so the next step's position is known before its verdict. Measured on the 2-core machine, target
# alone at 8 clients (docs/benchmarks.md): with 2, a verdict's trip back and the next step's trip out often
# took longer than a pass, so the verifier waited for them; 4 gave 1.11-1.23x the throughput. The verifier
# takes up to 8 proposals of a stream off the wire ahead of its verdicts (verifier_service/server.py).
STEPS_IN_FLIGHT = 4
MAX_ALTERNATIVES = 8  # alternatives a proposal may carry to its last candidate (`Proposal.alternatives`)


@dataclass
class Proposal:
    seq: int  # which committed length this was drafted after (the verifier rejects stale ones)
    kind: str  # TOKENS or TEXT
    target_ids: list = field(default_factory=list)  # TOKENS: candidate target ids
    q_ids: Optional[list] = None  # TOKENS, sampling: per candidate, the target ids with q > 0 (LongTensor)
    q_probs: Optional[list] = None  # TOKENS, sampling: per candidate, q of those ids (DoubleTensor, sums to 1)
    text: bytes = b""  # TEXT: the drafted string (bytes; may end inside a character)
    eos: bool = False  # TEXT: the drafter drafted its end-of-sequence after the text
    drafted: int = 0  # drafter tokens drafted (drafter forward passes)
    # drafted ahead and sent before the last verdict (crossdraft/rounds.py): valid only if the last committed
    # target id is this one (and seq the committed length); the verifier answers it as stale otherwise
    after: Optional[int] = None
    # TOKENS, greedy: other target ids likely in the last candidate's place (crossdraft/verifier.py)
    alternatives: list = field(default_factory=list)
    draft_ns: int = 0
    # drafter-local (not on the wire): of draft_ns, bringing the drafter's cache to the committed text first
    catchup_ns: int = 0
    catchup_tokens: int = 0  # drafter context tokens that took
    early: int = 0  # drafter-local: of drafted, the tokens drafted ahead, during the last round's verification
    # slrs, drafter-local statistics (not needed by the verifier, not on the wire):
    psi_ns: int = 0  # of draft_ns: computing the proposal distributions r (tree exploration)
    psi_forward_ns: int = 0  # of psi_ns: the drafter forward passes of that exploration
    psi_rows: int = 0  # drafter positions those passes ran (a pass runs a tree of them)
    slrs_fallbacks: int = 0  # candidate positions where the work bound left part of the tree unexpanded


@dataclass
class Verdict:
    seq: int  # committed length before this verdict
    ids: list  # newly committed target ids: accepted candidates, then the target's own token
    text: bytes  # the bytes those ids stand for
    candidates: int  # candidate target tokens verified
    accepted: int  # candidates accepted
    finished: bool = False
    finish_reason: str = ""  # "length" or "eos"
    verify_ns: int = 0
    bridge_ns: int = 0  # of verify_ns: re-tokenization and alignment (SLEM)
    alternative: bool = False  # the last committed candidate was one of the proposal's alternatives
    load: Optional[object] = None  # the verifier's load (`load.LoadHint`), for load-aware draft lengths
    seal: bytes = b""  # on the wire: the verifier's seal of this verdict for the gateway (crossdraft/seal.py)
