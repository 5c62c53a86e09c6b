"""The gRPC plumbing every crossdraft service shares (verifier, drafter, gateway).

- `channels`: message size limits, TLS, the plaintext-on-loopback rule
- `status`:   errors -> gRPC status codes, in one interceptor
- `service`:  the server (health, reflection, graceful shutdown) and the model services' main loop
- `streams`:  streaming handlers that compute in a worker thread
- `models`:   loading and warming a service's model
- `metrics`:  the Prometheus families of all three roles

The core library imports grpc only here, in `wire.py` (messages), `store.py` (redis, not grpc) and
`client.py`; the services import this package and the core, never one another.

Never: touches algorithms or session state.
"""
