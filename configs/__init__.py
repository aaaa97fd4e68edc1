"""Hydra config groups shipped with compress."""
