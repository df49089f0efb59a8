"""Toy world: a procedural text-to-image world with known truth, and the tiny Stable Diffusion trained on it."""
