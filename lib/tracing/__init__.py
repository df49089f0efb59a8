"""Causal tracing (Basu et al. 2023): corrupt the subject, restore one layer of the clean run, score the image."""
