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


@pytest.mark.parametrize("family", ["sd-v1", "sd-v2", "sdxl"])
def test_the_loop_is_the_pipeline_with_negative_prompts_and_batches(family):
    from diffusers import DDIMScheduler

    pipe = build_twin(family)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompts, lat = ["a photo of a cat", "a red car on a beach"], initial_latents(build_twin(family), [3, 4])
    ref = pipe(prompts, negative_prompt=["blurry"] * 2, num_inference_steps=3, guidance_scale=7.5,
               latents=lat.clone(), output_type="pt").images
    ours = generate(pipe, prompts, [3, 4], steps=3, guidance=7.5, negative="blurry")
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def test_one_prompt_string_is_one_prompt_and_every_text_is_length_checked():
    from lib.prompts import PromptError

    pipe = build_twin("sd-v1")
    assert len(encode(pipe, "a cat")) == 1  # not one prompt per character
    assert generate(pipe, "a cat", [1], steps=2).shape[0] == 1
    with pytest.raises(PromptError, match="tokens"):
        encode(pipe, ["a cat"], negative="blurry " * 80)  # was silently truncated


def test_step_counts_beyond_the_schedule_are_refused_in_one_line():
    from lib.sampling import make_scheduler

    pipe = build_twin("sd-v1")
    assert len(make_scheduler(pipe, 999).timesteps) == 999
    with pytest.raises(ValueError, match="1000 DDIM steps do not fit .*at most 999"):
        make_scheduler(pipe, 1000)  # was an IndexError inside the scheduler


def test_a_scheduler_config_without_clip_sample_gets_no_clipping():
    from diffusers import PNDMScheduler

    from lib.sampling import make_scheduler

    pipe = build_twin("sd-v1")
    cfg = {k: v for k, v in pipe.scheduler.config.items() if k != "clip_sample"}
    pipe.scheduler = PNDMScheduler.from_config(cfg)  # like SD v1.4's early scheduler config
    assert make_scheduler(pipe, 3).config.clip_sample is False
