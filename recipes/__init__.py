"""Recipes wire the rollout engine and the trainer together, from a CPU demo to verl + SGLang."""
