"""The gateway: the client-facing `crossdraft.v1.GatewayService` (server.py), its pools of drafters and
verifiers (pool.py) and where their members come from (membership.py: static, DNS, Kubernetes
EndpointSlices). Session state lives in the session store (`crossdraft.store`), never here."""
