"""Composed multi-stage experiments (the `recipe` config group)."""
