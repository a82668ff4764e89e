"""The node daemon: trio shells around the engine, Raft, ledger and network; its HTTP API."""
