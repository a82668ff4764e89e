"""The nemesis over real node processes (issue 16)."""
