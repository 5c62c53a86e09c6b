"""The gRPC plumbing every crossdraft service shares (verifier, drafter, gateway).

- `channels`:   message size limits, TLS, the plaintext-on-loopback rule
- `status`:     errors -> gRPC status codes, in one interceptor
- `service`:    the server (health, reflection, graceful shutdown, draining) and the model services' main loop
- `drain`:      how a drafter or verifier leaves a pool on SIGTERM: no new sessions, running ones handed back
- `streams`:    streaming handlers that compute in a worker thread
- `models`:     loading and warming a service's model (imports no grpc)
- `tokenizers`: fetching a verifier's tokenizer with GetTokenizer (drafters and the gateway)
- `metrics`:    the Prometheus families of all three roles

Who imports grpc in `crossdraft/`: this package (`channels`, `service` and `status` at import time), the
generated stubs in `crossdraft/v1/` (`*_pb2_grpc`), and, lazily, only where they talk to a service:
`client.py` (inside its methods), `cli.py` (`generate --gateway`; `serve` imports the services or
`compose.py`), `local_cluster.py` (health checks). `wire.py` imports the generated protobuf messages, not
grpc; `store.py` imports redis, only when a `RedisStore` is made. The rest of the core (algorithms,
bridge, runner, scheduler, engine, auto) imports neither. The services import this package and the core,
never one another.

Never: touches algorithms or session state.
"""
