"""SAGE (Liu et al., arXiv 2306.00974): adversarial search for failures of text-guided diffusion models.

* :mod:`lib.sage.loss` — the robust surrogate: an ensemble of classifiers (own preprocessing each) + edge member;
* :mod:`lib.sage.latent` — latent search (residual-gradient trick, Gaussian-shell projection), save / re-render;
* :mod:`lib.sage.prompt` — natural prompt search guided by a causal LM and embedding gradients;
* :mod:`lib.sage.token` — universal adversarial token embedding towards a target object;
* :mod:`lib.sage.metrics` — SSR(A), independent re-check, NGR;
* :mod:`lib.sage.build` — what notebooks 01–03 share: ensemble/checker from short specs, proposer LM, CLIP scorer,
  failure-category vocabularies, captions of a class;
* :mod:`lib.sage.report` — judged-image tables (ensemble + held-out checker) and before/after grids;
* :mod:`lib.sage.plots` — the QQ, loss and class-probability figures;
* :mod:`lib.sage.gradient` — loss scaling and gradient checks for float16 / bfloat16 backward passes;
* :mod:`lib.sage.campaign` — notebook 01's latent searches as units of work, sharded with ``accelerate launch``;
* :mod:`lib.sage.resume` — the key hashing everything a result depends on (atomic writes: :mod:`lib.atomic`).

No official code was released; every choice where the paper is silent is documented in the module docstrings and
exposed as a parameter.
"""

from lib.sage.loss import (  # noqa: F401
    ClipMember, Criteria, EdgeMember, Ensemble, FnMember, TimmMember, ToyMember, UnknownClassError,
    imagenet_groups, imagenet_labels, openclip_member, timm_member, toy_members,
)
