"""The verifier service: the target model behind `crossdraft.v1.VerifierService` (server.py)."""
