"""t2i-probe: SAGE, causal tracing and DiffQuickFix for the Stable Diffusion family, with an offline toy world."""
