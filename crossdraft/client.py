"""A client of the crossdraft gateway (`crossdraft.v1.GatewayService`), for users and `crossdraft generate --gateway`.

    from crossdraft.client import Client
    with Client("127.0.0.1:50050") as c:
        out = c.generate("def main():", max_new_tokens=48)       # the fields of GenerationResult.as_json()
        for piece in c.stream("def main():", 48, temperature=1.0, seed=7):
            print(piece, end="")

    with Client("gw.example:50050", api_key=KEY, tls_ca="ca.pem") as c:   # TLS and an API key

Owns: building a GenerationSpec from plain values, reading the Generate stream back into text and
statistics, GetSession and CancelSession as dicts; the channel's TLS (a CA, optionally a client
certificate) and the API key sent as `authorization: Bearer KEY` metadata with every call.

grpc is imported lazily, inside the methods, so `import crossdraft.client` works without grpc and only
using it needs it (who imports grpc in the core: `crossdraft/serving/__init__.py`).
A failed call raises `grpc.RpcError` with the gateway's status code and message. A generation whose
gateway goes away (UNAVAILABLE: killed, restarted, a network cut) is re-attached by itself.

Never: generates anything itself.
"""
from __future__ import annotations

import time
import uuid
from typing import Iterator, Optional

MAX_MESSAGE_BYTES = 8 << 20  # as the services (crossdraft.serving.channels.MAX_MESSAGE_BYTES)
_STATUS_NAMES = {1: "pending", 2: "running", 3: "finished"}


class Client:
    """A channel to one gateway; use it as a context manager or call close()."""

    def __init__(self, address: str, timeout: Optional[float] = None, reconnect_s: float = 60.0,
                 api_key: Optional[str] = None,
                 tls_ca: Optional[str] = None, tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
                 tls_server_name: Optional[str] = None):
        """`api_key`: sent with every call as `authorization: Bearer KEY` (default: $CROSSDRAFT_API_KEY);
        `tls_ca`: connect with TLS, verifying the gateway with this CA file (PEM); `tls_cert`/`tls_key`: a
        client certificate, for a gateway started with --tls-client-ca; `tls_server_name`: the name its
        certificate is checked against (default: the host of `address`)."""
        import os

        import grpc

        from .v1 import gateway_pb2_grpc

        self.address, self.timeout, self.reconnect_s = address, timeout, reconnect_s
        key = api_key if api_key is not None else os.environ.get("CROSSDRAFT_API_KEY") or None
        self._metadata = (("authorization", f"Bearer {key}"),) if key else None
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if tls_ca or tls_cert:
            def read(path):
                with open(path, "rb") as f:
                    return f.read()
            creds = grpc.ssl_channel_credentials(root_certificates=read(tls_ca) if tls_ca else None,
                                                 private_key=read(tls_key) if tls_key else None,
                                                 certificate_chain=read(tls_cert) if tls_cert else None)
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _spec(prompt: str, max_new_tokens: int, temperature: float, seed: int, algorithm: str,
              draft_tokens: Optional[int], top_k: int, top_p: float, model: str, drafter: str, stop=()):
        from . import wire
        from .sampling import SamplingParams
        from .v1 import gateway_pb2

        return gateway_pb2.GenerationSpec(
            prompt=prompt, max_new_tokens=max_new_tokens,
            params=wire.sampling_params_to_proto(SamplingParams(temperature, top_k, top_p, seed)),
            algorithm=wire.algorithm_to_proto(algorithm), draft_tokens=draft_tokens or 0, model=model, drafter=drafter,
            stop_strings=list(stop or ()))

    def events(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
               algorithm: str = "auto", draft_tokens: Optional[int] = None, top_k: int = 0, top_p: float = 1.0,
               session_id: str = "", model: str = "", drafter: str = "", stop=()) -> Iterator:
        """The raw messages of one generation (GenerateResponse; after a re-attach, AttachSessionResponse:
        the same fields). The session id is chosen here when not given, so that when the gateway goes
        away (UNAVAILABLE) the client re-attaches by itself, for up to `reconnect_s` seconds, from the
        byte offset it has: it receives exactly the rest, nothing lost and nothing twice."""
        import grpc

        from .v1 import gateway_pb2

        spec = self._spec(prompt, max_new_tokens, temperature, seed, algorithm, draft_tokens, top_k, top_p,
                          model, drafter, stop)
        sid = session_id or uuid.uuid4().hex
        offset, started, give_up, pause = 0, False, None, 0.1
        while True:
            try:
                if not started:
                    it = self._stub.Generate(gateway_pb2.GenerateRequest(spec=spec, session_id=sid),
                                             timeout=self.timeout, metadata=self._metadata)
                else:
                    it = self._stub.AttachSession(gateway_pb2.AttachSessionRequest(session_id=sid, offset=offset),
                                                  timeout=self.timeout, metadata=self._metadata)
                for msg in it:
                    started, give_up, pause = True, None, 0.1
                    if msg.WhichOneof("event") == "delta":
                        offset = msg.delta.offset + len(msg.delta.text.encode("utf-8"))
                    yield msg
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or self.reconnect_s <= 0:
                    raise
                now = time.monotonic()
                give_up = give_up or now + self.reconnect_s
                if now > give_up:
                    raise
                time.sleep(pause)
                pause = min(1.0, pause * 2)

    def stream(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
               algorithm: str = "auto", draft_tokens: Optional[int] = None, top_k: int = 0, top_p: float = 1.0,
               session_id: str = "", model: str = "", drafter: str = "", stop=()) -> Iterator[str]:
        """The generated text, delta by delta, as it is committed."""
        for msg in self.events(prompt, max_new_tokens, temperature, seed, algorithm, draft_tokens, top_k, top_p,
                               session_id, model, drafter, stop):
            if msg.WhichOneof("event") == "delta" and msg.delta.text:
                yield msg.delta.text

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                 algorithm: str = "auto", draft_tokens: Optional[int] = None, top_k: int = 0, top_p: float = 1.0,
                 session_id: str = "", model: str = "", drafter: str = "", stop=()) -> dict:
        """One generation -> the fields of `engine.GenerationResult.as_json()` (text, new_tokens, seconds,
        tokens_per_second, algorithm, rounds, draft_tokens, accepted_tokens, acceptance, drafted,
        finish_reason, why, profile) plus `ids` and `session_id`."""
        from . import wire

        text, ids, end, sid = [], [], None, ""
        for msg in self.events(prompt, max_new_tokens, temperature, seed, algorithm, draft_tokens, top_k, top_p,
                               session_id, model, drafter, stop):
            sid = msg.session_id
            if msg.WhichOneof("event") == "delta":
                text.append(msg.delta.text)
                # after a re-attach from a byte offset, a delta's ids may begin before what we have
                ids[msg.delta.token_offset:] = list(msg.delta.ids)
            else:
                end = msg.end
        if end is None:
            raise RuntimeError(f"the gateway at {self.address} ended the stream before the generation's end")
        if end.error_message:
            from .errors import CrossdraftError

            raise CrossdraftError(f"session {sid}: {end.error_message}")
        return dict(_result(wire, "".join(text), end), ids=ids, session_id=sid)

    def get_session(self, session_id: str, include_output: bool = True) -> dict:
        """A session as a dict: session_id, status (pending, running, finished), text, ids, new_tokens,
        drafter/verifier addresses, and, once finished, the generation's result fields."""
        from . import wire
        from .v1 import gateway_pb2

        s = self._stub.GetSession(gateway_pb2.GetSessionRequest(session_id=session_id, include_output=include_output),
                                  timeout=self.timeout, metadata=self._metadata).session
        out = {"session_id": s.session_id, "status": _STATUS_NAMES.get(s.status, "unspecified"), "text": s.text,
               "ids": list(s.ids), "new_tokens": s.new_tokens, "text_bytes": s.text_bytes,
               "drafter_address": s.drafter_address, "verifier_address": s.verifier_address,
               "created_unix_ns": s.created_unix_ns, "updated_unix_ns": s.updated_unix_ns}
        if s.HasField("end"):
            out["result"] = _result(wire, s.text, s.end)
        return out

    def cancel(self, session_id: str) -> bool:
        """Cancel a session; True if this call cancelled it, False if it had already finished."""
        from .v1 import gateway_pb2

        return self._stub.CancelSession(gateway_pb2.CancelSessionRequest(session_id=session_id),
                                        timeout=self.timeout, metadata=self._metadata).cancelled

    def attach(self, session_id: str, offset: int = 0) -> Iterator[str]:
        """A session's text from byte `offset` on, delta by delta, until it ends."""
        from .v1 import gateway_pb2

        for msg in self._stub.AttachSession(gateway_pb2.AttachSessionRequest(session_id=session_id, offset=offset),
                                            timeout=self.timeout, metadata=self._metadata):
            if msg.WhichOneof("event") == "delta" and msg.delta.text:
                yield msg.delta.text


def _result(wire, text: str, end) -> dict:
    """GenerationEnd -> the fields and rounding of GenerationResult.as_json()."""
    st = wire.stats_from_proto(end.stats)
    seconds = st["seconds"]
    return {
        "text": text, "new_tokens": st["new_tokens"], "seconds": round(seconds, 6),
        "tokens_per_second": round(st["new_tokens"] / seconds, 3) if seconds > 0 else None,
        "algorithm": wire.algorithm_from_proto(end.algorithm), "rounds": st["rounds"],
        "draft_tokens": st["draft_tokens"], "accepted_tokens": st["accepted_tokens"],
        "acceptance": round(st["accepted_tokens"] / st["draft_tokens"], 4) if st["draft_tokens"] else None,
        "drafted": st["drafted"], "finish_reason": wire.finish_reason_from_proto(end.finish_reason), "why": end.why,
        "profile": {k: round(v, 6) for k, v in st["profile"].items()},
    }

