"""SAGE benchmark cases: the cost of one latent-search iteration, and of a whole search.

One iteration = the sampling loop from ``z + δ`` (steps before ``residual_step`` without gradient, the rest with it),
the VAE decode, the ensemble, the backward pass to ``δ`` through the residual path, the signed step and the shell
projection — exactly :func:`lib.sage.latent.search_latent`'s inner loop.

    python benchmarks/bench.py --cases sage_latent_iter --size full --device cuda --dtype float16
    python benchmarks/cases_sage.py --size tiny --iterations 100 --search-steps 10  # a whole search, CPU
    python benchmarks/cases_sage.py --model toy --steps 10 --batch 1 8 --threads 2  # batched searches, toy world
    python benchmarks/cases_sage.py --size full --stored --threads 2   # stored activations per checkpointing, CPU

Members: ``"small"`` (three tiny random conv nets, one behind Canny edges: CPU smoke) or ``"imagenet"`` (random-weight
timm ResNet-50 and ViT-B/16, plus a ResNet-50 behind Canny edges: the cost of a realistic ensemble, no download).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from unittest.mock import patch

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.sage.gradient import loss_scale_for, scaled_grad_rows  # noqa: E402
from lib.sage.latent import LatentSearch, Residual, project_to_shell, sample_with_residual, search_latent, signed_step  # noqa: E402
from lib.sage.loss import EdgeMember, Ensemble, FnMember, timm_member  # noqa: E402
from lib.sage.build import freeze_pipeline  # noqa: E402
from lib.sampling import decode, encode, initial_latents, make_scheduler, predict_noise  # noqa: E402
from lib.speed import CHECKPOINTING, save_memory, stored_activation_bytes  # noqa: E402

PROMPT = "a photo of a cat"


def make_members(kind: str = "small", device: str | torch.device = "cpu") -> Ensemble:
    """An ensemble for timing: ``small`` (random tiny conv nets) or ``imagenet`` (random timm ResNet-50, ViT-B/16)."""
    if kind == "small":
        def net(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, 3)).to(device)

        labels = ("cat", "dog", "car")
        return Ensemble([FnMember(net(1), labels, "a"), FnMember(net(2), labels, "b"),
                         EdgeMember(FnMember(net(3), labels, "c"))])
    if kind == "imagenet":
        r50 = timm_member("resnet50", pretrained=False, device=str(device))
        vit = timm_member("vit_base_patch16_224", pretrained=False, device=str(device))
        edge = EdgeMember(timm_member("resnet50", pretrained=False, device=str(device)))
        return Ensemble([r50, vit, edge], groups={"cat": ("tabby", "tiger cat", "persian cat", "siamese cat",
                                                          "egyptian cat")})
    raise ValueError(f"unknown members {kind!r}; choose 'small' or 'imagenet'")


def _memory_setup(pipe, checkpointing: str | None, vae_slicing: bool) -> dict:
    freeze_pipeline(pipe)  # gradients only for δ: no weight grads are stored
    return save_memory(pipe, checkpointing, vae_slicing)


def latent_iteration_fn(pipe, ensemble: Ensemble, steps: int = 50, residual_step: int | None = None,
                        guidance: float = 7.5, seed: int = 0, batch: int = 1, info: dict | None = None):
    """A closure running one latent-search iteration (state kept across calls, like the search) of ``batch``
    independent searches run together (:func:`lib.sage.latent.search_latents`: the per-search losses are summed,
    so each δ gets its own search's gradient, at its own float16 loss scale). ``info`` (if given) is kept up to date
    with the float16 loss scale at the start and now (the lowest search's: a lower one means backward passes were
    repeated after an overflow), whether the last gradient was finite, and the backward passes of the last iteration
    and the most of any (``backward_passes`` / ``backward_passes_max``: more than 1 when an overflow repeated them,
    which the iteration's time then includes)."""
    z = initial_latents(pipe, list(range(seed, seed + batch)))
    cond = encode(pipe, [PROMPT] * batch, None)
    state = {"delta": torch.zeros_like(z, dtype=torch.float32),
             "scales": torch.full((batch,), loss_scale_for(pipe), dtype=torch.float64)}
    info = {} if info is None else info
    info["loss_scale_start"] = loss_scale_for(pipe)
    residual = Residual(step=residual_step)

    def run() -> float:
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA graph trees (no-op without them)
        delta = state["delta"].requires_grad_(True)
        zp = (z.float() + delta).to(z.dtype)
        probs = ensemble.probs(decode(pipe, sample_with_residual(pipe, zp, cond, steps, guidance, residual)))
        loss = ensemble.loss(probs, "cat", "uncertain")
        value = float(loss.detach().sum())
        # float16: loss-scaled per search, the graph retained for a retry (each retry is one more backward pass)
        passes = [0]
        real_grad = torch.autograd.grad

        def counted(*args, **kwargs):
            passes[0] += 1
            return real_grad(*args, **kwargs)

        with patch.object(torch.autograd, "grad", counted):
            g, state["scales"] = scaled_grad_rows(loss, delta, list(range(batch)), state["scales"])
        info.update(loss_scale=float(state["scales"].min()), grad_finite=bool(torch.isfinite(g).all()),
                    backward_passes=passes[0], backward_passes_max=max(passes[0], info.get("backward_passes_max", 0)))
        del zp, probs, loss
        with torch.no_grad():
            d = signed_step(delta, g, 0.05, -1.0, 1.0)
            state["delta"] = project_to_shell(z.float() + d, 3.0) - z.float()
        return value

    return run


def _members_name(members: str | Ensemble, ens: Ensemble) -> str:
    """``members`` as given ("small", "imagenet"), or the names of a ready ensemble."""
    return members if isinstance(members, str) else " + ".join(ens.names)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_latent_iteration(pipe, steps: int = 50, residual_step: int | None = None, members: str | Ensemble = "small",
                           repeats: int = 3, warmup: int = 1, checkpointing: str | None = "blocks",
                           vae_slicing: bool = True, guidance: float = 7.5, batch: int = 1) -> dict:
    """Time one latent-search iteration (forward + backward through the residual path, decode, classifiers).

    ``checkpointing``/``vae_slicing``: :func:`lib.speed.save_memory`. Returns seconds per iteration (median/min over
    ``repeats``), the activations stored for the backward pass (``stored_gib``, counted during the first warm-up
    iteration, on any device; None without warm-up) and peak memory: CUDA ``max_memory_allocated`` on a GPU, the process's peak RSS on a CPU (a lifetime
    maximum, so it includes everything loaded before).
    """
    device = pipe.unet.device
    memory = _memory_setup(pipe, checkpointing, vae_slicing)
    ens = make_members(members, device) if isinstance(members, str) else members
    run = latent_iteration_fn(pipe, ens, steps, residual_step, guidance, batch=batch)
    stored = None
    for i in range(warmup):
        if i == 0:
            _, stored = stored_activation_bytes(run, exclude=(pipe.unet, pipe.vae, pipe.text_encoder, ens))
        else:
            run()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    k = steps // 2 if residual_step is None else residual_step
    out = dict(steps=steps, residual_step=k, backprop_unet_steps=steps - k, members=_members_name(members, ens),
               dtype=str(pipe.unet.dtype), device=str(device), resolution=int(pipe.unet.config.sample_size * 8),
               **memory,
               times_s=times, median_s=statistics.median(times), min_s=min(times), batch=batch,
               s_per_search_iteration=statistics.median(times) / batch, stored_gib=None if stored is None else stored / 2**30)
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def stored_per_call(pipe, modes=CHECKPOINTING) -> dict:
    """GiB that autograd stores for one differentiated UNet call (one image: its CFG pair of rows) and for one VAE
    decode, per :func:`lib.speed.save_memory` setting (:func:`lib.speed.stored_activation_bytes`: any device; a CPU
    measures in minutes what a GPU run of a whole iteration would need). Per search and iteration,
    ``differentiated steps × unet + vae``."""
    z = initial_latents(pipe, [0])
    cond = encode(pipe, [PROMPT])
    t = make_scheduler(pipe, 50).timesteps[25]
    weights = (pipe.unet, pipe.vae, pipe.text_encoder)
    out = {}
    for mode in modes:
        save_memory(pipe, mode)
        x = z.clone().requires_grad_(True)
        _, unet = stored_activation_bytes(lambda: predict_noise(pipe, x, t, cond, 7.5), exclude=weights)
        _, vae = stored_activation_bytes(lambda: decode(pipe, x), exclude=weights)
        out[mode or "none"] = dict(unet_call_gib=unet / 2**30, vae_decode_gib=vae / 2**30)
        print(json.dumps({"checkpointing": mode or "none", **out[mode or "none"]}), flush=True)
    save_memory(pipe, None)
    return out


def bench_latent_search(pipe, iterations: int = 100, steps: int = 10, members: str | Ensemble = "small",
                        seed: int = 0) -> dict:
    """Wall time of a whole search of ``iterations`` updates (no early stop)."""
    ens = make_members(members, pipe.unet.device) if isinstance(members, str) else members
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    t0 = time.perf_counter()
    r = search_latent(pipe, ens, PROMPT, "cat", seed=seed, steps=steps,
                      config=LatentSearch(mode="type1", iterations=iterations, stop_on_success=False))
    wall = time.perf_counter() - t0
    return dict(iterations=iterations, steps=steps, members=_members_name(members, ens), wall_s=wall,
                s_per_iteration=wall / (iterations + 1), found=r.found, loss_first=r.history[0],
                loss_last=r.history[-1], best_loss=r.best_loss)


# ---------------------------------------------------------------------------------------------- bench.py integration
def _case(batch: int, tie: float = 0.5, checkpointing: str | None = "blocks"):
    """``batch`` searches per iteration, the residual tied at ``tie`` × the steps (0.5: the notebooks' default);
    ``checkpointing`` (:func:`lib.speed.save_memory`; None: none) at full size on a GPU, none elsewhere unless it
    checkpoints steps (so the tiny CPU run exercises the step checkpoints too)."""
    def build(ctx):
        pipe = ctx.pipe("sd-v1")
        full = ctx.size == "full"
        steps = 50 if full else 4
        k = int(round(tie * steps))
        on = checkpointing is not None and ((full and ctx.device.type == "cuda") or checkpointing.startswith("steps"))
        memory = _memory_setup(pipe, checkpointing if on else None, True)
        ens = make_members("imagenet" if full else "small", ctx.device)
        info: dict = {}  # filled in by the runs: bench.py records it after the timed ones
        run = latent_iteration_fn(pipe, ens, steps, residual_step=k, batch=batch, info=info)
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        params = dict(steps=steps, residual_step=k, members="imagenet" if full else "small", resolution=side,
                      guidance=7.5, searches=batch, **memory)
        if batch > 1:
            params["batch"] = batch  # bench.py then also reports s_per_search_iteration: one iteration of one search
        return run, params, info

    return build


# one search; independent searches as one batch (notebook 01's BATCH_SIZE): 8 ran at 67 GiB on the H100 (~7.9 GiB per
# search) with per-block checkpointing, so 3 is the largest such batch expected to fit the 30 GiB target; "_k40": the
# residual tied at step 40 of 50, so 10 UNet steps are differentiated instead of 25 (on the toy world a late tie found
# as many failures: RESULTS.md); "_steps": each differentiated UNet call checkpointed whole instead (the same
# recomputation; stored activations no longer grow with the differentiated steps, one call's held at a time in the
# backward pass); "_nested": both (one call's block boundaries at a time; one more UNet forward per step);
# "_nockpt": no checkpointing, so no recomputation: one search with the late tie stores 10 differentiated UNet calls
# (1.75 GiB each in float16) and one VAE decode (2.8 GiB), ~20 GiB besides the weights (from the CPU measurement of
# stored activations, RESULTS.md), and it is the case for CUDA graphs (`--compile-mode reduce-overhead`): at batch 1
# a CFG UNet call is launch-bound (30 ms per image on the H100 at batch 1, 6.4 ms at batch 32: RESULTS.md)
CASES = {"sage_latent_iter": _case(1), "sage_latent_iter_b3": _case(3), "sage_latent_iter_b8": _case(8),
         "sage_latent_iter_k40": _case(1, 0.8), "sage_latent_iter_b3_k40": _case(3, 0.8),
         "sage_latent_iter_k40_nockpt": _case(1, 0.8, checkpointing=None),
         "sage_latent_iter_b8_steps": _case(8, checkpointing="steps"),
         "sage_latent_iter_b16_nested": _case(16, checkpointing="steps+blocks")}


def main(argv: list[str] | None = None) -> int:
    from lib.twins import build_twin

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    ap.add_argument("--steps", type=int, default=50, help="sampling steps of the timed iteration")
    ap.add_argument("--residual-step", type=int, default=None)
    ap.add_argument("--members", choices=("small", "imagenet"), default=None)
    ap.add_argument("--iterations", type=int, default=0, help="also time a whole search of this many iterations")
    ap.add_argument("--search-steps", type=int, default=10, help="sampling steps of the --iterations search")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--checkpointing", choices=[m or "none" for m in CHECKPOINTING], default=None,
                    help="lib.speed.save_memory (default: blocks on a GPU, none on a CPU)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1],
                    help="independent searches per iteration (one timing per value: per-search time = time / batch)")
    ap.add_argument("--model", default=None,
                    help="time this pipeline (e.g. 'toy', with its classifiers resnet + edges; --members is ignored) "
                         "instead of a twin")
    ap.add_argument("--stored", action="store_true",
                    help="only the activations stored per differentiated UNet call and VAE decode, per checkpointing")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("float16" if device.type == "cuda" else "float32"))
    members = a.members or ("imagenet" if a.size == "full" else "small")
    ckpt = a.checkpointing or ("blocks" if device.type == "cuda" else "none")
    from bench import environment  # the same facts as bench.py's JSON: versions, commit, GPU

    report = dict(size=a.size, threads=torch.get_num_threads(), model=a.model or f"twin:sd-v1:{a.size}",
                  device=str(device), dtype=str(dtype), checkpointing=ckpt,  # spelt as each row spells it
                  members="resnet+edges" if a.model else members, environment=environment(device))
    if a.model:
        from lib.loading import load_pipeline
        from lib.sage.build import build_ensemble, freeze_pipeline

        pipe = load_pipeline(a.model, device=str(device), dtype=str(dtype).replace("torch.", ""))
        freeze_pipeline(pipe)
        members = build_ensemble(["resnet", "edges"], None, device=str(device))[0]
    else:
        pipe = build_twin("sd-v1", a.size, dtype=dtype).to(device)
    if a.stored:
        report["stored_gib"] = stored_per_call(pipe)
        a.batch = []
    report["iteration"] = []
    for b in a.batch:
        r = bench_latent_iteration(pipe, a.steps, a.residual_step, members, a.repeats,
                                   checkpointing=None if ckpt == "none" else ckpt, batch=b)
        report["iteration"].append(r)
        print(json.dumps(r), flush=True)
    if a.iterations:
        report["search"] = bench_latent_search(pipe, a.iterations, a.search_steps, members)
        print(json.dumps(report["search"]), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
