"""Shipped meter profiles (TOML data files; see docs/meters.md)."""
