"""Tools built on the node: the demo microgrid and the deterministic market simulation."""
