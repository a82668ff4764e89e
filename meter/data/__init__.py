"""Data files: the BDEW H25 standard load profile (from demandlib, MIT)."""
