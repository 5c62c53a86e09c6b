"""The verifier service: the target model behind `crossdraft.v1.VerifierService` (server.py), and the
gRPC plumbing every crossdraft service shares (common.py: status codes, health, reflection, shutdown)."""
