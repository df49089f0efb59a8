"""Shape twins: randomly initialised SD v1 / v2 / XL pipelines with the real module names and topology.

``size="full"`` uses the released configs (for GPU benchmarks: speed does not depend on the weights' values);
``size="tiny"`` keeps every block, layer and module name but shrinks the widths and the resolution, so that every
method can be tested offline on CPU against the real layer structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lib.tokenizer import build_clip_tokenizer

Family = Literal["sd-v1", "sd-v2", "sdxl"]
Size = Literal["tiny", "full"]
FAMILIES: tuple[str, ...] = ("sd-v1", "sd-v2", "sdxl")

# Released UNet configs (CompVis/stable-diffusion-v1-4, stabilityai/stable-diffusion-2-1-base,
# stabilityai/stable-diffusion-xl-base-1.0), the fields that define topology and width.
_UNET_FULL: dict[str, dict[str, Any]] = {
    "sd-v1": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        sample_size=64,
    ),
    "sd-v2": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        sample_size=64,
    ),
    "sdxl": dict(
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        sample_size=128,
    ),
}

# Tiny widths: same blocks, layers and names. Head counts must divide the widths.
_UNET_TINY_WIDTHS: dict[str, dict[str, Any]] = {
    "sd-v1": dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=4, norm_num_groups=8, sample_size=8),
    "sd-v2": dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=(2, 4, 4, 4), norm_num_groups=8, sample_size=8),
    "sdxl": dict(
        block_out_channels=(32, 64, 64),
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        sample_size=8,
        addition_time_embed_dim=8,
    ),
}


@dataclass(frozen=True)
class TextSpec:
    """A CLIP text tower: width, depth, heads, activation, projection (None: plain CLIPTextModel)."""

    hidden: int
    layers: int
    heads: int
    act: str
    projection: int | None = None

    def config(self, tiny: bool) -> CLIPTextConfig:
        hidden, heads = (32, 4) if tiny else (self.hidden, self.heads)
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=self.layers,  # depth is topology: kept in tiny twins
            num_attention_heads=heads,
            max_position_embeddings=77,
            hidden_act=self.act,
            projection_dim=(32 if tiny else self.projection) if self.projection else hidden,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )


_CLIP_L = TextSpec(768, 12, 12, "quick_gelu")  # openai/clip-vit-large-patch14 (SD 1.x, SDXL encoder 1)
_TEXT: dict[str, list[TextSpec]] = {
    "sd-v1": [_CLIP_L],
    "sd-v2": [TextSpec(1024, 23, 16, "gelu")],  # OpenCLIP ViT-H/14 minus its last layer
    "sdxl": [_CLIP_L, TextSpec(1280, 32, 20, "gelu", projection=1280)],  # + OpenCLIP ViT-bigG/14
}


def unet_config(family: Family, size: Size = "tiny") -> dict[str, Any]:
    """The UNet config of a twin; ``cross_attention_dim`` follows the twin's text encoders."""
    _check(family, size)
    cfg = dict(_UNET_FULL[family])
    if size == "tiny":
        cfg.update(_UNET_TINY_WIDTHS[family])
        cfg["cross_attention_dim"] = sum(s.config(True).hidden_size for s in _TEXT[family])
        if family == "sdxl":
            cfg["projection_class_embeddings_input_dim"] = 6 * cfg["addition_time_embed_dim"] + 32
    return cfg


def vae_config(family: Family, size: Size = "tiny") -> dict[str, Any]:
    """The SD autoencoder: 4 blocks (8× downsampling), 4 latent channels."""
    _check(family, size)
    tiny = size == "tiny"
    return dict(
        block_out_channels=(8, 16, 16, 16) if tiny else (128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1 if tiny else 2,
        latent_channels=4,
        norm_num_groups=4 if tiny else 32,
        sample_size=64 if tiny else (1024 if family == "sdxl" else 512),
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )


def build_twin(family: Family, size: Size = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised pipeline of ``family`` with the real module names (``torch.manual_seed(seed)``)."""
    _check(family, size)
    tiny = size == "tiny"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(family, size))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config(family, size))
    encoders = []
    for i, spec in enumerate(_TEXT[family]):
        torch.manual_seed(seed + 2 + i)
        cls = CLIPTextModelWithProjection if spec.projection else CLIPTextModel
        encoders.append(cls(spec.config(tiny)))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=build_clip_tokenizer(),
            tokenizer_2=build_clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
        )
    else:
        pad = "!" if family == "sd-v2" else "<|endoftext|>"  # SD 2.x pads like OpenCLIP (stabilityai's tokenizer)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=build_clip_tokenizer(pad_token=pad), unet=unet,
            scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def component_config(family: Family, size: Size, component: str) -> dict[str, Any] | None:
    """The config of a twin's ``unet``, ``text_encoder`` or ``text_encoder_2`` without building it (None: no such
    component)."""
    _check(family, size)
    if component == "unet":
        return unet_config(family, size)
    index = {"text_encoder": 0, "text_encoder_2": 1}.get(component)
    if index is None or index >= len(_TEXT[family]):
        return None
    return _TEXT[family][index].config(size == "tiny").to_dict()


def resolution(pipe) -> int:
    """Default image side in pixels of a pipeline (latent sample size × VAE factor)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def _check(family: str, size: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown twin family {family!r}; choose one of {', '.join(FAMILIES)}")
    if size not in ("tiny", "full"):
        raise ValueError(f"unknown twin size {size!r}; choose 'tiny' or 'full'")
