"""Test tooling: scripted node processes, the Raft simulator and nemesis (never imported by the
daemon)."""
