import pytest
import torch

from lib.sampling import decode, denoise, encode, generate, initial_latents
from lib.twins import build_twin


@pytest.mark.parametrize("family", ["sd-v1", "sdxl"])
def test_loop_matches_the_diffusers_pipeline(family):
    pipe = build_twin(family)
    pipe.set_progress_bar_config(disable=True)
    lat = initial_latents(pipe, [7])
    from diffusers import DDIMScheduler

    # the same scheduler class as the loop (DDIM), so the pipeline call is the reference
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref = pipe("a photo of a cat", num_inference_steps=3, guidance_scale=5.0, latents=lat.clone(),
               output_type="pt").images
    with torch.no_grad():
        ours = decode(pipe, denoise(pipe, lat, encode(pipe, ["a photo of a cat"]), steps=3, guidance=5.0))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_same_seed_same_image_and_seeds_differ():
    pipe = build_twin("sd-v1")
    a = generate(pipe, ["a cat", "a cat"], [1, 2], steps=2)
    b = generate(pipe, ["a cat"], [1], steps=2)
    assert torch.allclose(a[:1], b, atol=1e-5) and not torch.allclose(a[0], a[1], atol=1e-2)
    assert torch.equal(b, generate(pipe, ["a cat"], [1], steps=2))  # same seed, same CPU: same numbers
