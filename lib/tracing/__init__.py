"""Causal tracing (Basu et al. 2023): corrupt the subject, restore one layer of the clean run, score the image.

Modules: ``layers`` (candidate layers / text sites), ``corrupt`` (subject noise), ``unet`` (batched UNet restoration
and the one-run-per-layer reference), ``text_encoder`` (per layer × token restoration of hidden state, self-attention
and MLP outputs, every encoder), ``score`` (CLIP-Score rows, recovery, threshold rule; the scorers live in
:mod:`lib.scoring`), ``sweep`` (resumable, sharded sweeps), ``probes`` (probe sets), ``report`` (tables and the
paper's findings), ``plots`` (figures), ``examples`` (restored-image examples for the grids), ``notebook`` (what
notebooks 04 and 05 share: parameters, loading, the sharding command).
"""
