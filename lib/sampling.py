"""A plain, hookable classifier-free-guided sampling loop for SD 1.x / 2.x / XL pipelines.

The methods need more control than ``pipe(...)`` gives (restoring activations at every step, gradients through
the loop, per-seed latents), so they share this loop. It mirrors the diffusers pipelines with a DDIM scheduler
(checked to 1e-5 on the SD 1.x, 2.x and XL twins, negative prompts and batches included): same text encoding,
same CFG arithmetic ``eps_u + g·(eps_c − eps_u)``, same scheduler step, same VAE decoding (SDXL's float16 VAE
decodes in float32, as in its pipeline). Not mirrored: diffusers switches guidance off for
``g ≤ 1`` (this loop always applies the formula; at ``g = 1`` it is the conditional prediction), and
``guidance_rescale`` (for zero-SNR v-prediction models; none of the presets is one) is not offered, and a
``linspace`` timestep spacing, which diffusers' DDIM steps off its own timesteps, is sampled as ``trailing``
(:func:`make_scheduler`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from diffusers import DDIMScheduler
from torch.utils.checkpoint import checkpoint

from lib.prompts import check_length


@dataclass
class Conditioning:
    """Text conditioning of a batch: ``cond``/``uncond`` hidden states (B, 77, D) and SDXL's added inputs."""

    cond: torch.Tensor
    uncond: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds, time_ids (cond)
    added_uncond: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.cond.shape[0]

    def select(self, index: torch.Tensor | Sequence[int]) -> "Conditioning":
        """Rows ``index`` of the batch (e.g. to repeat one caption for many restored runs)."""
        idx = torch.as_tensor(index, device=self.cond.device)
        pick = lambda d: {k: v[idx] for k, v in d.items()}  # noqa: E731
        return Conditioning(self.cond[idx], self.uncond[idx], pick(self.added), pick(self.added_uncond))


TOKENIZER_OF: dict[str, str] = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def is_sdxl(pipe) -> bool:
    """Two text encoders (``text_encoder_2`` present): the SDXL family."""
    return getattr(pipe, "text_encoder_2", None) is not None


def text_encoder_names(pipe) -> list[str]:
    """The pipeline's text encoders that are present with their tokenizer (:data:`TOKENIZER_OF`): ``text_encoder``
    and, on SDXL, ``text_encoder_2``."""
    present = lambda name: getattr(pipe, name, None) is not None  # noqa: E731
    return [n for n, t in TOKENIZER_OF.items() if present(n) and present(t)]


def tokenizer_for(pipe, encoder: str):
    """The tokenizer that feeds ``encoder`` (``tokenizer_2`` for ``text_encoder_2``)."""
    return getattr(pipe, TOKENIZER_OF[encoder])


def conditioning_layers(pipe, encoder: str = "text_encoder") -> int:
    """How many of ``encoder``'s layers reach the UNet's token conditioning: all of them on SD 1.x / 2.x (the last
    hidden state), all but the last on SDXL (the penultimate hidden state; ``text_encoder_2``'s last layer feeds only
    the pooled embedding)."""
    depth = int(getattr(pipe, encoder).config.num_hidden_layers)
    return depth - 1 if is_sdxl(pipe) else depth


def layer_reaches_unet(pipe, encoder: str, layer: int) -> bool:
    """Whether ``encoder``'s ``layer`` output reaches the UNet at all: through the token conditioning
    (:func:`conditioning_layers`) or, for SDXL's ``text_encoder_2``, through the pooled embedding of its last layer."""
    return layer < conditioning_layers(pipe, encoder) or (is_sdxl(pipe) and encoder == "text_encoder_2")


def encode(pipe, prompts: str | Sequence[str], negative: str | None = None, truncate: bool = False,
           grad: bool = False) -> Conditioning:
    """Encode prompts (and the negative prompt for CFG) exactly as the pipeline would.

    ``negative=None`` is the pipelines' default: the empty prompt (SD 1.x/2.x) or zeros (SDXL). Without gradient
    unless ``grad`` (and gradients are enabled by the caller): SAGE's slot embeddings on SDXL need it.
    """
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return _encode(pipe, prompts, negative, truncate)


def _encode(pipe, prompts: str | Sequence[str], negative: str | None, truncate: bool) -> Conditioning:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)  # one prompt, not one per character
    check_length(pipe.tokenizer, prompts + ([] if negative is None else [negative]), truncate=truncate,
                 fix="shorten it or pass truncate=True")
    device = pipe.unet.device
    negative = None if negative is None else [negative] * len(prompts)
    if not is_sdxl(pipe):
        cond, uncond = pipe.encode_prompt(prompts, device, 1, True, negative)
        return Conditioning(cond, uncond)
    cond, uncond, pooled, pooled_u = pipe.encode_prompt(
        prompts, device=device, do_classifier_free_guidance=True, negative_prompt=negative
    )
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = pipe._get_add_time_ids(
        (side, side), (0, 0), (side, side), dtype=cond.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    ).to(device).repeat(len(prompts), 1)
    return Conditioning(cond, uncond, {"text_embeds": pooled, "time_ids": time_ids},
                        {"text_embeds": pooled_u, "time_ids": time_ids})


def initial_latents(pipe, seeds: Sequence[int]) -> torch.Tensor:
    """One latent per seed, drawn on the CPU so a seed gives the same latent on every device."""
    side = pipe.unet.config.sample_size
    shape = (1, pipe.unet.config.in_channels, side, side)
    lat = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return lat.to(pipe.unet.device, pipe.unet.dtype)


class ScheduleWarning(UserWarning):
    """The pipeline's scheduler config was adapted so that DDIM can step it (see :func:`make_scheduler`)."""


def make_scheduler(pipe, steps: int):
    """A fresh DDIM scheduler (deterministic, eta = 0) with the pipeline's noise schedule. A config that does not say
    ``clip_sample`` (old PNDM configs of SD v1) gets no x0 clipping, not DDIM's default clipping to [-1, 1].

    ``timestep_spacing="linspace"`` (the default of Euler, LMS, DPM-Solver, UniPC and Heun configs) becomes
    ``"trailing"`` with a :class:`ScheduleWarning`: DDIM always steps from ``t`` to ``t - 1000 // steps``, so on
    linspace timesteps (999, 888, …, 0 for 10 steps) each step lands off the next timestep the UNet is given
    (diffusers' own pipeline with a DDIM scheduler does the same). Trailing also starts at the last timestep."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = pipe.scheduler.config
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing == "linspace":
        warnings.warn("the scheduler config's timestep_spacing 'linspace' is stepped inconsistently by DDIM; "
                      "sampling with 'trailing' instead", ScheduleWarning, stacklevel=2)
        spacing = "trailing"
    sched = DDIMScheduler.from_config(cfg, clip_sample=cfg.get("clip_sample", False), timestep_spacing=spacing)
    last = (steps - 1) * (sched.config.num_train_timesteps // steps) + sched.config.steps_offset
    if sched.config.timestep_spacing == "leading" and last >= sched.config.num_train_timesteps:
        raise ValueError(f"{steps} DDIM steps do not fit this schedule of {sched.config.num_train_timesteps} "
                         f"timesteps (steps_offset {sched.config.steps_offset}); use at most "
                         f"{sched.config.num_train_timesteps - sched.config.steps_offset}")
    sched.set_timesteps(steps, device=pipe.unet.device)
    return sched


def scheduler_settings(pipe) -> dict:
    """The pipeline's scheduler config (the noise schedule :func:`make_scheduler` builds every DDIM sampler from),
    without diffusers' bookkeeping entries (``_diffusers_version``, ``_use_default_values``, ...)."""
    sched = getattr(pipe, "scheduler", None)
    config = getattr(sched, "config", None) or {}
    return {k: v for k, v in dict(config).items() if not str(k).startswith("_")}


def scheduler_fingerprint(pipe) -> str:
    """A short hash of :func:`scheduler_settings` (resume keys: another noise schedule never reuses results)."""
    import hashlib
    import json

    blob = json.dumps(scheduler_settings(pipe), sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


_STEP_CHECKPOINTING = "_lib_step_checkpointing"


def set_step_checkpointing(pipe, enabled: bool = True) -> None:
    """Checkpoint every UNet call made with gradient (SAGE's differentiated steps): the forward pass keeps only the
    call's inputs, and the backward pass recomputes one call at a time, so the stored activations no longer grow with
    the number of differentiated steps. The price is one more UNet forward per differentiated step (as with
    diffusers' per-block checkpointing; with both on they nest). Results are unchanged (the same kernels rerun).
    Usually set through :func:`lib.speed.save_memory`."""
    setattr(pipe, _STEP_CHECKPOINTING, bool(enabled))


def step_checkpointing(pipe) -> bool:
    """Whether :func:`set_step_checkpointing` is on for ``pipe``."""
    return bool(getattr(pipe, _STEP_CHECKPOINTING, False))


def _unet_eps(unet, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, added: dict | None) -> torch.Tensor:
    return unet(x, t, encoder_hidden_states=emb, added_cond_kwargs=added).sample


def predict_noise(pipe, latents: torch.Tensor, t: torch.Tensor, c: Conditioning, guidance: float) -> torch.Tensor:
    """The guided noise prediction for one step; unconditional and conditional halves in one UNet call
    (checkpointed when it runs with gradient and :func:`set_step_checkpointing` is on)."""
    x = torch.cat([latents, latents])
    emb = torch.cat([c.uncond, c.cond])
    added = {k: torch.cat([c.added_uncond[k], c.added[k]]) for k in c.added} or None
    if torch.is_grad_enabled() and step_checkpointing(pipe):
        eps = checkpoint(_unet_eps, pipe.unet, x, t, emb, added, use_reentrant=False)
    else:
        eps = _unet_eps(pipe.unet, x, t, emb, added)
    eps_u, eps_c = eps.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def denoise(pipe, latents: torch.Tensor, c: Conditioning, steps: int = 25, guidance: float = 7.5,
            callback: StepCallback | None = None) -> torch.Tensor:
    """Run the sampling loop from initial latents; ``callback(i, t, latents)`` after each step.

    Gradients flow when the caller enables them (SAGE); wrap in ``torch.no_grad()`` otherwise.
    """
    sched = make_scheduler(pipe, steps)
    x = latents * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        eps = predict_noise(pipe, sched.scale_model_input(x, t), t, c, guidance)
        x = sched.step(eps, t, x).prev_sample
        if callback is not None:
            callback(i, t, x)
    return x


def upcast_sdxl_vae(pipe) -> bool:
    """Keep an SDXL VAE that asks for it (``force_upcast``: it overflows in float16) in float32 for good; True if it
    was float16. For good, not per decode as diffusers' SDXL pipeline does: a backward pass through the decode (SAGE)
    needs the weights autograd saved in the dtype they were used in. A pre-hook on the decoder's first layer casts
    float16 latents to float32, so the pipeline's own decode (``pipe(...)``) still works."""
    vae = pipe.vae
    if not (is_sdxl(pipe) and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)):
        return False
    vae.to(torch.float32)
    first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
    first.register_forward_pre_hook(lambda module, args: tuple(
        a.to(torch.float32) if torch.is_tensor(a) and a.is_floating_point() else a for a in args))
    return True


DECODE_PIXELS = 8 * 512 * 512  # image pixels per VAE call without gradient: 8 images at 512 px, 2 at 1024 px


def decode(pipe, latents: torch.Tensor, keep_nonfinite: bool = False) -> torch.Tensor:
    """Latents → images in [0, 1], shape (B, 3, H, W) (an SDXL VAE in float16 is upcast first:
    :func:`upcast_sdxl_vae`). A VAE whose config gives ``latents_mean`` / ``latents_std`` (some SDXL fine-tunes) gets
    its latents de-normalised with them, as the SDXL pipeline does. ``keep_nonfinite``: NaN where the VAE's output is
    not finite (the tracing flags such runs; the clamp alone turns ±inf into plain white / black pixels).

    Without gradient, the latents are decoded ``DECODE_PIXELS`` image pixels at a time: a VAE decode peaks near
    0.4 GiB per 512-px image in float16 and 3 GiB per 1024-px image in SDXL's float32 VAE, so a tracing or generation
    batch decoded at once would not fit a GPU (toy-world batches stay one call). A decode that gradients flow
    through is one call: what it stores for the backward pass is :func:`lib.speed.save_memory`'s to shrink."""
    upcast_sdxl_vae(pipe)
    vae = pipe.vae
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    z = latents.to(vae.dtype)
    if mean is not None and std is not None:
        if not len(mean) == len(std) == z.shape[1]:
            raise ValueError(f"the VAE config's latents_mean / latents_std have {len(mean)} / {len(std)} values for "
                             f"latents of {z.shape[1]} channels")
        shape = (1, len(mean), 1, 1)
        z = z * torch.tensor(std).view(shape).to(z) / vae.config.scaling_factor + torch.tensor(mean).view(shape).to(z)
    else:
        z = z / vae.config.scaling_factor
    per_call = max(1, DECODE_PIXELS // (z.shape[-2] * z.shape[-1] * pipe.vae_scale_factor ** 2))
    parts = [z] if torch.is_grad_enabled() and z.requires_grad else z.split(per_call)
    img = torch.cat([vae.decode(part).sample.float() / 2 + 0.5 for part in parts])
    return img.clamp(0, 1).masked_fill(~torch.isfinite(img), float("nan")) if keep_nonfinite else img.clamp(0, 1)


@torch.no_grad()
def generate(pipe, prompts: str | Sequence[str], seeds: Sequence[int], steps: int = 25, guidance: float = 7.5,
             negative: str | None = None, batch_size: int | None = None) -> torch.Tensor:
    """Images for ``prompts[i]`` with ``seeds[i]`` (lengths must match), in [0, 1], on the pipeline's device;
    ``batch_size`` images at a time (None: all in one batch)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size is not None and len(seeds) > batch_size:
        return torch.cat([generate(pipe, prompts[i : i + batch_size], list(seeds[i : i + batch_size]), steps, guidance,
                                   negative) for i in range(0, len(seeds), batch_size)])
    lat = denoise(pipe, initial_latents(pipe, seeds), encode(pipe, prompts, negative), steps, guidance)
    return decode(pipe, lat)


def generate_all(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
                 batch_size: int = 64, progress: Any = None) -> torch.Tensor:
    """Images for every (prompt, seed), prompt-major (``index = i_prompt * len(seeds) + i_seed``), in [0, 1], float32
    on the CPU, generated ``batch_size`` at a time. ``progress``: a flag or a bar (:mod:`lib.progress`), in images."""
    from lib.progress import progress_bar

    jobs = [(p, s) for p in prompts for s in seeds]
    out = []
    with progress_bar(progress, len(jobs), "generating", "img") as bar:
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i : i + batch_size]
            out.append(generate(pipe, [p for p, _ in chunk], [s for _, s in chunk], steps, guidance).float().cpu())
            if bar is not None:
                bar.update(len(chunk))
    return torch.cat(out) if out else torch.empty(0, 3, 1, 1)


def to_pil(images: torch.Tensor):
    """[0, 1] image tensor (B, 3, H, W) → list of PIL images."""
    from PIL import Image

    arr = (images.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]
