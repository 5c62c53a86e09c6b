"""The drafter service: a small model behind `crossdraft.v1.DrafterService` (server.py) that runs
sessions against a verifier over one Verify stream each, and a client for it (client.py)."""
