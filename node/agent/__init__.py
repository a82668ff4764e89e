"""The household's agent: what to offer or bid, and what to sign (pure, sans-I/O)."""
