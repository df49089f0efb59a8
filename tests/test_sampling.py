import pytest
import torch

from lib.sampling import decode, denoise, encode, generate, initial_latents
from lib.twins import build_twin


def test_initial_latents_are_drawn_on_the_cpu_in_the_unet_s_dtype():
    pipe = build_twin("sd-v1")
    lat = initial_latents(pipe, [7, 8])
    assert lat.dtype == torch.float32 and lat.shape == (2, 4, 8, 8) and not torch.equal(lat[0], lat[1])
    half = initial_latents(pipe.to(torch.float16), [7, 8])
    assert half.dtype == torch.float16 and torch.equal(half, lat.half())  # the same draw, in float16


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


@pytest.mark.parametrize("scheduler, extra", [("PNDMScheduler", dict(prediction_type="v_prediction")),  # SD 2.x 768
                                              ("EulerDiscreteScheduler", dict(prediction_type="epsilon")),  # SDXL's
                                              ("DDIMScheduler", dict(prediction_type="v_prediction",
                                                                     set_alpha_to_one=True, clip_sample=True))])
def test_the_loop_is_the_pipeline_with_ddim_made_from_other_scheduler_configs(scheduler, extra):
    """The loop samples with DDIM built from the pipeline's scheduler config (lib.sampling.make_scheduler): a
    released pipeline's PNDM or Euler config, v-prediction and DDIM's own options must carry over, so the pipeline
    called with DDIM from the same config is the reference (the twins alone ship DDIM, epsilon, leading)."""
    import diffusers

    pipe = build_twin("sd-v2")
    pipe.set_progress_bar_config(disable=True)
    cfg = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}  # _use_default_values: dropped
    cfg = {**cfg, **extra, "timestep_spacing": "leading"}
    pipe.scheduler = getattr(diffusers, scheduler).from_config(cfg)
    lat = initial_latents(pipe, [5])
    ours = generate(pipe, ["a photo of a cat"], [5], steps=3, guidance=6.0)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.prediction_type == extra["prediction_type"]
    ref = pipe("a photo of a cat", num_inference_steps=3, guidance_scale=6.0, latents=lat.clone(),
               output_type="pt").images
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def test_same_seed_same_image_and_seeds_differ():
    pipe = build_twin("sd-v1")
    a = generate(pipe, ["a cat", "a cat"], [1, 2], steps=2)
    b = generate(pipe, ["a cat"], [1], steps=2)
    assert torch.allclose(a[:1], b, atol=1e-5) and not torch.allclose(a[0], a[1], atol=1e-2)
    assert torch.equal(b, generate(pipe, ["a cat"], [1], steps=2))  # same seed, same CPU: same numbers


def test_generation_in_batches_gives_each_prompt_its_seed(monkeypatch):
    import lib.sampling as S

    pipe = build_twin("sd-v1")
    prompts, seeds = ["a cat", "a dog", "a car", "a cat"], [3, 1, 4, 1]
    calls = []
    real = S.encode
    monkeypatch.setattr(S, "encode", lambda p, texts, negative=None: calls.append(list(texts)) or real(p, texts, negative))
    parts = generate(pipe, prompts, seeds, steps=2, batch_size=3)
    assert calls == [prompts[:3], prompts[3:]]
    alone = torch.cat([generate(pipe, [p], [s], steps=2) for p, s in zip(prompts, seeds)])
    assert parts.shape == alone.shape and torch.allclose(parts, alone, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        generate(pipe, prompts, seeds, steps=2, batch_size=0)


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
    with pytest.raises(ValueError, match="1000 DDIM steps do not fit .*at most 999") as err:
        make_scheduler(pipe, 1000)  # was an IndexError inside the scheduler
    assert "\n" not in str(err.value), str(err.value)


def test_a_scheduler_config_without_clip_sample_gets_no_clipping():
    from diffusers import PNDMScheduler

    from lib.sampling import make_scheduler

    pipe = build_twin("sd-v1")
    cfg = {k: v for k, v in pipe.scheduler.config.items() if k != "clip_sample"}
    pipe.scheduler = PNDMScheduler.from_config(cfg)  # like SD v1.4's early scheduler config
    assert make_scheduler(pipe, 3).config.clip_sample is False


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_every_timestep_spacing_follows_its_own_trajectory(spacing):
    """With a denoiser that returns the exact noise of a known x0, deterministic DDIM must land exactly on the final
    noise level's state. On ``linspace`` timesteps DDIM stepped off them (error 0.36 at 10 steps), so ``linspace``
    configs (Euler, DPM-Solver, ...) are sampled with ``trailing`` and say so."""
    import types
    import warnings

    from diffusers import EulerDiscreteScheduler

    from lib.sampling import Conditioning, ScheduleWarning, make_scheduler

    pipe = build_twin("sd-v1")
    cfg = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    pipe.scheduler = EulerDiscreteScheduler.from_config({**cfg, "timestep_spacing": spacing})
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 1, 4, 8, 8, generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched = make_scheduler(pipe, 10)
    assert [issubclass(w.category, ScheduleWarning) for w in caught] == ([True] if spacing == "linspace" else [])
    if spacing == "linspace":  # sampled as trailing: from the last training timestep, as linspace itself starts
        assert sched.config.timestep_spacing == "trailing" and int(sched.timesteps[0]) == 999
    ac = sched.alphas_cumprod

    class Oracle(torch.nn.Module):  # eps of x_t = sqrt(a) x0 + sqrt(1 - a) eps, at the timestep it is told
        config, device, dtype = pipe.unet.config, torch.device("cpu"), torch.float32

        def forward(self, x, t, **kw):
            a = ac[int(t)]
            return types.SimpleNamespace(sample=(x - a.sqrt() * x0) / (1 - a).sqrt())

    pipe.unet = Oracle()
    a0, af = ac[sched.timesteps[0]], sched.final_alpha_cumprod
    cond = Conditioning(torch.zeros(1, 77, 32), torch.zeros(1, 77, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScheduleWarning)
        out = denoise(pipe, a0.sqrt() * x0 + (1 - a0).sqrt() * noise, cond, steps=10, guidance=1.0)
    assert torch.allclose(out, af.sqrt() * x0 + (1 - af).sqrt() * noise, atol=1e-4), spacing


def test_a_vae_with_latent_statistics_decodes_as_the_sdxl_pipeline_does():
    """Some SDXL fine-tunes (e.g. Playground v2.5) give latents_mean / latents_std in the VAE config."""
    from diffusers import AutoencoderKL, DDIMScheduler

    pipe = build_twin("sdxl")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    config = {k: v for k, v in pipe.vae.config.items() if k != "_use_default_values"}  # else the new values are dropped
    vae = AutoencoderKL.from_config(dict(config, latents_mean=[0.5, -0.3, 0.2, 0.1], latents_std=[2.0, 0.5, 1.5, 1.0]))
    assert vae.config.latents_mean is not None
    vae.load_state_dict(pipe.vae.state_dict())
    lat = initial_latents(pipe, [5])
    before = generate(pipe, "a photo of a cat", [5], steps=2, guidance=5.0)
    pipe.vae = vae
    pipe.register_modules(vae=vae)
    ref = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=5.0, latents=lat.clone(),
               output_type="pt").images
    ours = generate(pipe, "a photo of a cat", [5], steps=2, guidance=5.0)
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    assert (ours - before).abs().max() > 1e-2  # the statistics matter: the check is not vacuous


def test_latent_statistics_of_the_wrong_length_are_named():
    from diffusers import AutoencoderKL

    pipe = build_twin("sd-v1")
    config = {k: v for k, v in pipe.vae.config.items() if k != "_use_default_values"}
    pipe.vae = AutoencoderKL.from_config(dict(config, latents_mean=[0.0], latents_std=[1.0]))
    with pytest.raises(ValueError, match="latents_mean / latents_std have 1 / 1 values for latents of 4 channels"):
        decode(pipe, initial_latents(pipe, [0]))


def test_a_vae_overflow_decodes_to_nan_not_to_black_or_white(monkeypatch):
    """clamp(0, 1) turned ±inf into plain pixels, so the tracing's non-finite check could not see a VAE overflow."""
    from types import SimpleNamespace

    from lib.tracing.unet import nonfinite

    pipe = build_twin("sd-v1")
    lat = initial_latents(pipe, [0])
    img = decode(pipe, lat)
    out = torch.full_like(img, 0.3) * 2 - 1
    out[0, 0, 0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    monkeypatch.setattr(pipe.vae, "decode", lambda z: SimpleNamespace(sample=out))
    bad = decode(pipe, lat, keep_nonfinite=True)  # as the tracing decodes
    assert bad[0, 0, 0, :3].isnan().all() and torch.allclose(bad[0, 0, 0, 3:], torch.tensor(0.3))
    assert nonfinite(lat, bad).tolist() == [True] and nonfinite(lat, img).tolist() == [False]
    plain = decode(pipe, lat)  # elsewhere (classifiers, pictures): the clamped image, as before
    assert plain[0, 0, 0, :2].tolist() == [1.0, 0.0] and plain[0, 0, 0, 2].isnan()


def test_a_large_batch_is_decoded_in_parts_without_gradient_and_in_one_call_with_it(monkeypatch):
    """A tracing batch at SD's sizes decoded in one call would not fit a GPU (SDXL: ~3 GiB per image): without
    gradient the decode goes ``DECODE_PIXELS`` image pixels at a time, to the same images; the toy world's batches,
    and a decode that SAGE differentiates, stay one call."""
    import lib.sampling as S

    pipe = build_twin("sd-v1")  # 64-px images
    lat = initial_latents(pipe, list(range(5)))
    calls = []
    real = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z: calls.append(len(z)) or real(z))
    with torch.no_grad():
        whole = decode(pipe, lat)
        monkeypatch.setattr(S, "DECODE_PIXELS", 2 * 64 * 64)
        parts = decode(pipe, lat)
    assert calls == [5, 2, 2, 1] and torch.allclose(parts, whole, atol=1e-5)
    calls.clear()
    g = lat.clone().requires_grad_(True)
    decode(pipe, g).sum().backward()
    assert calls == [5] and g.grad.abs().sum() > 0
