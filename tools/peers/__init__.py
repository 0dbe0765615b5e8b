"""Upstream protocol peers: full endpoints with their own stores (not mocks), kept apart from the gateway."""
