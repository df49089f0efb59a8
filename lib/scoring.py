"""CLIP-Score = 100 · max(cos(image, text), 0), with open_clip for real models or any CLIP-like model offline."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipScorer:
    """Wraps a CLIP-like model: ``encode_image`` on normalised pixels, ``encode_text`` on token ids.

    ``images`` given to the methods are float tensors in [0, 1], shape (B, 3, H, W); they are resized to
    ``image_size`` and normalised here, so gradients flow back to the pixels (SAGE uses that). ``module``: the model
    behind the two functions, when there is one: :meth:`to` moves it, its dtype is the one the pixels are cast to,
    and :func:`lib.sage.resume.campaign_key` hashes its weights.
    """

    encode_image: Callable[[torch.Tensor], torch.Tensor]
    encode_text: Callable[[torch.Tensor], torch.Tensor]
    tokenize: Callable[[Sequence[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    device: torch.device = torch.device("cpu")
    module: nn.Module | None = None
    architecture: str = ""  # what the weights do not show but the scores depend on (e.g. "quick_gelu")
    interpolation: str = "bicubic"  # the model's own resize (open_clip's preprocess_cfg)
    resize_mode: str = "shortest"  # a non-square image: "shortest" side to image_size, then a centre crop (open_clip's
    #   and transformers' eval preprocessing); "squash": both sides to image_size

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``module``'s floating-point weights (float32 without a module)."""
        if self.module is None:
            return torch.float32
        p = next((p for p in self.module.parameters() if p.is_floating_point()), None)
        return torch.float32 if p is None else p.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ClipScorer":
        """Move (and/or cast) ``module``; in place, returns ``self``."""
        if self.module is None:
            raise ValueError("this ClipScorer wraps functions, not a module; build it on the device you need")
        self.module.to(device=device, dtype=dtype)
        if device is not None:
            self.device = torch.device(device)
        return self

    def fingerprint(self) -> str | None:
        """A cheap hash of ``module``'s weights and the preprocessing: results scored by another CLIP (e.g. a
        retrained toy CLIP behind the same ``"auto"`` spec) never pass for these. None without a module."""
        if self.module is None:
            return None
        from lib.loading import weights_fingerprint

        prep = f"{self.image_size}|{tuple(self.mean)}|{tuple(self.std)}"
        prep += f"|{self.architecture}" if self.architecture else ""
        if (self.interpolation, self.resize_mode) != ("bicubic", "shortest"):  # the defaults keep earlier hashes
            prep += f"|{self.interpolation}|{self.resize_mode}"
        return weights_fingerprint({"clip": self.module}) + "-" + hashlib.sha1(prep.encode()).hexdigest()[:6]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        s, (h, w) = self.image_size, x.shape[-2:]
        if (h, w) != (s, s):
            if self.resize_mode == "shortest" and h != w:  # as torchvision's Resize(s) then CenterCrop(s)
                size = (s, int(s * w / h)) if h < w else (int(s * h / w), s)
            else:
                size = (s, s)
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False,
                              antialias=True)  # without it a downscale (512 -> 224) aliases
            top, left = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
            x = x[..., top : top + s, left : left + s]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return F.normalize(self.encode_image(((x - mean) / std).to(self.dtype)).float(), dim=-1)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.encode_text(self.tokenize(list(texts)).to(self.device)).float(), dim=-1)

    def score(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """CLIP-Score of each image against its caption (one caption per image), shape (B,)."""
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        cos = (self.image_features(images) * self.text_features(captions)).sum(-1)
        return 100.0 * cos.clamp(min=0)

    def rank(self, images: torch.Tensor, candidates: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of every image to every candidate caption, shape (B, len(candidates))."""
        return self.image_features(images) @ self.text_features(candidates).T


def openclip_scorer(model_name: str = "ViT-L-14", pretrained: str | None = "openai", device: str = "cpu") -> ClipScorer:
    """open_clip's CLIP (ViT-L/14 with OpenAI weights, as in the papers); ``pretrained=None`` for random weights.

    Built with the activation its weights were trained with: OpenAI's CLIPs use QuickGELU, which open_clip's plain
    ``ViT-L-14`` config lacks (open_clip only warns and loads them into a GELU model, which quietly moves every score).
    """
    import open_clip

    quick_gelu = bool(pretrained and open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device=device,
                                       force_quick_gelu=quick_gelu).eval()
    except RuntimeError as err:
        if "Failed to download" not in str(err):
            raise
        from lib.loading import ModelLoadError

        raise ModelLoadError(f"open_clip {model_name} weights {pretrained!r} are not available locally and cannot be "
                             "downloaded here: fetch them where the hub is reachable (they go to the Hugging Face "
                             "cache), or give SCORER='openclip:<model>:<a local checkpoint file>' (OpenAI weights: "
                             "<model> with -quickgelu, e.g. ViT-L-14-quickgelu)") from None
    from open_clip.transformer import QuickGELU

    quick_gelu = any(isinstance(m, QuickGELU) for m in model.modules())  # as built (a -quickgelu config, or forced)
    tokenizer = open_clip.get_tokenizer(model_name)
    size = model.visual.image_size
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}  # open_clip >= 2.2x: its eval transform's settings
    if cfg.get("resize_mode") not in (None, "shortest", "squash") or cfg.get("interpolation") not in (None, "bicubic",
                                                                                                       "bilinear"):
        raise ValueError(f"open_clip {model_name}: preprocessing {cfg} is not one ClipScorer reproduces")
    return ClipScorer(
        encode_image=model.encode_image,
        encode_text=model.encode_text,
        tokenize=lambda texts: tokenizer(texts),
        image_size=size if isinstance(size, int) else size[0],
        mean=tuple(getattr(model.visual, "image_mean", None) or OPENAI_MEAN),
        std=tuple(getattr(model.visual, "image_std", None) or OPENAI_STD),
        device=torch.device(device),
        module=model,
        architecture="quick_gelu" if quick_gelu else "",
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
    )


def hf_clip_scorer(model, tokenizer, image_size: int | None = None, mean=OPENAI_MEAN, std=OPENAI_STD) -> ClipScorer:
    """A scorer from a transformers ``CLIPModel`` (the toy world's CLIP, or any local CLIP checkpoint)."""
    device = next(model.parameters()).device
    return ClipScorer(
        encode_image=lambda px: pooled_features(model.get_image_features(pixel_values=px)),
        encode_text=lambda ids: pooled_features(model.get_text_features(input_ids=ids)),
        tokenize=lambda texts: tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids,
        image_size=image_size or model.config.vision_config.image_size,
        mean=tuple(mean),
        std=tuple(std),
        device=device,
        module=model,
    )


def pooled_features(out) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor from ``get_*_features``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ------------------------------------------------------------------------------------------ which CLIP scores a model
TOY_PIXEL_MEAN = (0.5, 0.5, 0.5)  # the toy CLIP takes pixels in [-1, 1] (lib.toy.train.clip_preprocess)
TOY_PIXEL_STD = (0.5, 0.5, 0.5)


def toy_clip_scorer(folder=None, device: str | torch.device = "cpu", tokenizer=None) -> ClipScorer:
    """CLIP-Score with the toy world's CLIP (``folder``, default ``data/toy``, holds ``text_encoder/`` and
    ``clip_vision/``; 64 px inputs scaled to [-1, 1], as it was trained)."""
    from lib.paths import resolve_toy_folder
    from lib.tokenizer import build_clip_tokenizer
    from lib.toy.train import load_toy_clip

    model = load_toy_clip(resolve_toy_folder(folder)).to(device)
    return hf_clip_scorer(model, tokenizer or build_clip_tokenizer(), mean=TOY_PIXEL_MEAN, std=TOY_PIXEL_STD)


def random_toy_clip_scorer(seed: int = 0, device: str = "cpu") -> ClipScorer:
    """A randomly initialised toy-size CLIP (seeded): meaningless scores at toy cost, for twins and smoke tests."""
    from lib.tokenizer import build_clip_tokenizer
    from lib.toy.train import new_clip

    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # the caller's CPU and CUDA streams
        torch.manual_seed(seed)
        model = new_clip().eval()
    model = model.to(device)
    return hf_clip_scorer(model, build_clip_tokenizer(), mean=TOY_PIXEL_MEAN, std=TOY_PIXEL_STD)


SCORER_SPECS = "auto, toy[:<folder>], random or openclip:<model>:<pretrained|none>"


def check_scorer_spec(spec: str) -> None:
    """Raise ``ValueError`` for a scorer spec that :func:`scorer_for` would not accept (checked before any loading):
    a ``toy:<folder>`` that does not exist, an ``openclip:<model>`` without its weights part (``none`` says random
    weights; left out, they were random silently)."""
    from lib.paths import resolve_toy_folder

    kind, _, rest = str(spec).partition(":")
    if spec in ("auto", "random", "toy"):
        return
    if kind == "toy" and rest:
        if not resolve_toy_folder(rest).is_dir():
            raise ValueError(f"scorer {spec!r}: no folder {rest!r} (relative paths are taken from the repo root)")
        return
    if kind == "openclip" and rest:
        name, _, pretrained = rest.partition(":")
        if name and pretrained:
            return
        if name:
            raise ValueError(f"scorer {spec!r} names no weights: use openclip:{name}:<pretrained> (e.g. "
                             f"openclip:ViT-L-14:openai) or openclip:{name}:none for random weights")
    raise ValueError(f"unknown scorer {spec!r}; use {SCORER_SPECS}")


def scorer_for(model: str, spec: str = "auto", device: str = "cpu") -> ClipScorer:
    """The CLIP-Score model for ``model`` (tracing, the token attack, DiffQuickFix).

    ``spec``: ``auto`` (a toy-world folder, e.g. ``toy`` → its toy CLIP, an edited one's → its source's, unedited; a
    shape twin → a random toy-size
    CLIP; anything else → open_clip ViT-L/14 with OpenAI weights, as in the paper), ``toy`` / ``toy:<folder>``,
    ``random`` (random toy-size CLIP), or ``openclip:<model>:<pretrained|none>``.
    """
    from lib.loading import describe_source, is_toy_world, toy_source

    if spec == "auto":
        kind, where = describe_source(model)
        if is_toy_world(model):  # a missing clip_vision/ is named, not replaced; an edited toy world: its source's CLIP
            return toy_clip_scorer(toy_source(where) or where, device=device)
        if kind == "twin":
            return random_toy_clip_scorer(device=device)
        return openclip_scorer("ViT-L-14", "openai", device=device)
    check_scorer_spec(spec)
    kind, _, rest = spec.partition(":")
    if kind == "toy":
        from lib.paths import resolve_toy_folder

        return toy_clip_scorer(resolve_toy_folder(rest), device=device)  # relative: working directory, else repo root
    if kind == "random":
        return random_toy_clip_scorer(device=device)
    name, _, pretrained = rest.partition(":")  # openclip, checked above
    return openclip_scorer(name, None if pretrained == "none" else pretrained, device=device)
