"""A client of the drafter service: run one session and collect its output.

Owns: reading the stream of committed deltas of a `RunSessionRequest` (`crossdraft.wire.session_request`
builds one) back into target ids, text and statistics. Used by the tests and tools; the gateway runs
its sessions itself.

Never: drafts or verifies; a failed call raises `grpc.RpcError` with the server's status.
"""
from __future__ import annotations

from typing import Iterator, Optional

import grpc

from crossdraft import wire
from crossdraft.sampling import SamplingParams
from crossdraft.serving.channels import CHANNEL_OPTIONS
from crossdraft.v1 import drafter_pb2, drafter_pb2_grpc
from crossdraft.wire import session_request


def stream_session(drafter_address: str, request: drafter_pb2.RunSessionRequest,
                   timeout: Optional[float] = None) -> Iterator[drafter_pb2.RunSessionResponse]:
    """The RunSession stream's messages, as they arrive."""
    with grpc.insecure_channel(drafter_address, options=CHANNEL_OPTIONS) as channel:
        yield from drafter_pb2_grpc.DrafterServiceStub(channel).RunSession(request, timeout=timeout)


def run_session(drafter_address: str, verifier_address: str, prompt: str, max_new_tokens: int = 128,
                params: SamplingParams = SamplingParams(), algorithm: str = "auto",
                draft_tokens: Optional[int] = None, session_id: str = "",
                timeout: Optional[float] = None) -> tuple:
    """(ids, text, stats): the generated target ids, their text (decoded as the engine does, invalid
    UTF-8 replaced) and a dict of statistics (`wire.stats_from_proto`'s keys plus algorithm, why,
    finish_reason) of one session run by the drafter at drafter_address against the verifier at
    verifier_address."""
    req = session_request(verifier_address, prompt, max_new_tokens, params, algorithm, draft_tokens, session_id)
    ids, data, last, why = [], b"", None, ""
    for msg in stream_session(drafter_address, req, timeout):
        if msg.token_offset != len(ids):
            raise RuntimeError(f"delta at offset {msg.token_offset}, expected {len(ids)}")
        ids.extend(msg.ids)
        data += msg.text
        why = why or msg.why
        last = msg
    if last is None or not last.finished:
        raise RuntimeError("the session's stream ended before it finished")
    stats = wire.stats_from_proto(last.stats)
    stats.update(algorithm=wire.algorithm_from_proto(last.algorithm), why=why,
                 finish_reason=wire.finish_reason_from_proto(last.finish_reason))
    return ids, data.decode("utf-8", errors="replace"), stats
