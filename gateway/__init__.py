"""The gateway: the client-facing `crossdraft.v1.GatewayService` (server.py) and its pools of drafters and
verifiers (pool.py). Session state lives in the session store (`crossdraft.store`), never here."""
