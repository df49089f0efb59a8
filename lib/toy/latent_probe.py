"""Does the VAE latent still hold a named character? A small CNN probe on latents against the classifiers on round trips.

The toy world's named characters fail in Picasso style, and the VAE round trip alone already loses most of them
(README, "Quality on held-out prompts"). Whether the 8 × 8 × 4 latent has lost the character, or the decoder fails to
draw what the latent holds, decides where a fix belongs (a wider latent and a new UNet, or the decoder alone). This
module measures both on one task: for scenes in one style, tell the four characters from the plain objects they are
made of (snoopy vs a plain dog, …; 8 classes, chance 0.125):

* ``latent``: a two-layer CNN probe trained on the posterior means of ``n_train`` renders, tested on ``n_test`` others
  (a lower bound on what the latent holds: the probe is small and its data finite);
* ``pixels8``: the same probe on the renders average-pooled to 8 × 8 (what the latent's resolution alone allows);
* ``roundtrip``: the classifier ensemble on the VAE round trips of the test renders (what the decoder conveys);
* ``render``: the ensemble on the test renders themselves;
* with ``image_probes`` (``--image-probes``): ``roundtrip_probe``, the same probe trained and tested on the round trips
  of the same renders, and ``render_probe``, on the renders themselves (full 64 × 64 images, behind a learned 8 × 8
  patch embedding). ``roundtrip_probe`` against ``latent`` says whether the decoder conveys what the latent holds;
  against ``roundtrip`` whether the general classifiers read what the round trips convey.

    python -m lib.toy.latent_probe --style picasso --n-train 48000 --out runs/latent_probe
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.atomic import write_text_atomic
from lib.paths import TOY_DIR
from lib.toy import world as W

CHARACTERS: tuple[str, ...] = W.CHARACTERS
CLASSES: tuple[str, ...] = CHARACTERS + tuple(f"plain {W.CHARACTER_OBJECT[c]}" for c in CHARACTERS)


def character_scenes(style: str | None, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[W.Scene]]:
    """``n`` renders (float (n, 3, 64, 64) in [0, 1]) of the 8-class task in ``style`` (``None``: unstyled), their
    class indices into :data:`CLASSES` and scenes; the other attributes are drawn as the world draws them."""
    from lib.toy.evaluate import grid_scene

    if style is not None and style not in W.STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(W.STYLES)} (or none)")
    rng = np.random.default_rng(seed)
    ys = rng.integers(len(CLASSES), size=n)
    k = len(CHARACTERS)
    scenes = [grid_scene(rng, {"character": CHARACTERS[y], "style": style} if y < k else
                         {"object": W.CHARACTER_OBJECT[CHARACTERS[y - k]], "character": None, "style": style})
              for y in ys]
    images = np.stack([np.asarray(W.render(s, rng)) for s in scenes]) if n else np.empty((0, 64, 64, 3), np.uint8)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.as_tensor(ys), scenes


def probe_accuracy(z_train: torch.Tensor, y_train: torch.Tensor, z_test: torch.Tensor, y_test: torch.Tensor,
                   n_classes: int = len(CLASSES), steps: int = 3000, batch: int = 128, seed: int = 0
                   ) -> tuple[float, float]:
    """(test, train) accuracy of a two-layer CNN probe (64 channels, AdamW 1e-3) on standardised (N, C, H, W) inputs.

    Inputs larger than 8 × 8 (images) first pass a learned patch embedding (a ``H // 8`` strided convolution to 32
    channels, as the VAE's f = 8 encoder sees 8 × 8 patches), so every input is probed at the latent's resolution."""
    c, h, w = z_train.shape[1:]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        stem = [nn.Conv2d(c, 32, h // 8, stride=h // 8), nn.ReLU()] if h > 8 else []
        c, h, w = (32, 8, w // (h // 8)) if stem else (c, h, w)
        net = nn.Sequential(*stem, nn.Conv2d(c, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                            nn.ReLU(), nn.Flatten(), nn.Linear(64 * h * w, n_classes))
    mu, sd = z_train.mean((0, 2, 3), keepdim=True), z_train.std((0, 2, 3), keepdim=True) + 1e-6
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(z_train), (batch,), generator=gen)
        loss = F.cross_entropy(net((z_train[idx] - mu) / sd), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        test = (net((z_test - mu) / sd).argmax(-1) == y_test).float().mean()
        train = (net((z_train - mu) / sd).argmax(-1) == y_train).float().mean()
    return float(test), float(train)


@torch.no_grad()
def latents(vae, x: torch.Tensor, batch_size: int = 200) -> torch.Tensor:
    """Posterior means of float images in [0, 1]."""
    p = next(vae.parameters())
    return torch.cat([vae.encode((x[i : i + batch_size] * 2 - 1).to(p.device, p.dtype)).latent_dist.mean.float().cpu()
                      for i in range(0, len(x), batch_size)])


def class_accuracy(classifier, images: torch.Tensor, y: torch.Tensor) -> float:
    """How often ``classifier`` (``predict`` → character and object names) names the right one of :data:`CLASSES`."""
    pred = classifier.predict(images)
    k = len(CHARACTERS)
    plain = [W.CHARACTER_OBJECT[c] for c in CHARACTERS]
    got = [CHARACTERS.index(c) if c in CHARACTERS else (k + plain.index(o) if o in plain else -1)
           for c, o in zip(pred["character"], pred["object"])]
    return float((torch.tensor(got) == y).float().mean())


def run_probe(style: str | None, n_train: int = 48_000, n_test: int = 800, steps: int = 3000, seed: int = 0,
              model: str | Path = TOY_DIR, vae=None, classifiers: Mapping | None = None,
              image_probes: bool = False) -> dict:
    """The four accuracies of the module docstring for ``style`` (renders of seeds ``seed + 1`` / ``seed + 2``)."""
    from lib.toy.evaluate import load_toy_world, vae_roundtrip, with_ensemble

    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    character_scenes(style, 0, seed)  # an unknown style fails before loading anything
    if vae is None or classifiers is None:
        pipe, members, _ = load_toy_world(model)
        vae = pipe.vae if vae is None else vae
        classifiers = members if classifiers is None else classifiers
    ensemble = with_ensemble(classifiers)["ensemble"]
    t0 = time.time()
    x_tr, y_tr, _ = character_scenes(style, n_train, seed + 1)
    x_te, y_te, _ = character_scenes(style, n_test, seed + 2)
    z_tr, z_te = latents(vae, x_tr), latents(vae, x_te)
    lat, lat_train = probe_accuracy(z_tr, y_tr, z_te, y_te, steps=steps, seed=seed)
    pix, _ = probe_accuracy(F.avg_pool2d(x_tr, 8), y_tr, F.avg_pool2d(x_te, 8), y_te, steps=steps, seed=seed)
    rt_te = vae_roundtrip(vae, x_te)
    row = {"style": style or "none", "n_train": n_train, "n_test": n_test, "steps": steps, "seed": seed,
           "latent": round(lat, 4), "latent_train": round(lat_train, 4), "pixels8": round(pix, 4),
           "roundtrip": round(class_accuracy(ensemble, rt_te, y_te), 4),
           "render": round(class_accuracy(ensemble, x_te, y_te), 4)}
    if image_probes:
        rt_tr = torch.cat([vae_roundtrip(vae, x_tr[i : i + 1000]) for i in range(0, len(x_tr), 1000)])
        row["roundtrip_probe"] = round(probe_accuracy(rt_tr, y_tr, rt_te, y_te, steps=steps, seed=seed)[0], 4)
        row["render_probe"] = round(probe_accuracy(x_tr, y_tr, x_te, y_te, steps=steps, seed=seed)[0], 4)
    return {**row, "wall_s": round(time.time() - t0, 1)}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--style", nargs="+", default=["picasso"], help="styles to probe ('none': unstyled)")
    ap.add_argument("--n-train", type=int, default=48_000)
    ap.add_argument("--n-test", type=int, default=800)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=str(TOY_DIR), help="toy-world folder (vae/, classifiers/)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--image-probes", action="store_true",
                    help="also train the probe on the round trips and on the renders (64 x 64; slower)")
    ap.add_argument("--out", default=None, help="folder for latent_probe.json")
    a = ap.parse_args(argv)
    styles = [None if s == "none" else s for s in a.style]
    for s in styles:
        character_scenes(s, 0, a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [run_probe(s, a.n_train, a.n_test, a.steps, a.seed, a.model, image_probes=a.image_probes) for s in styles]
    for r in rows:
        print(json.dumps(r), flush=True)
    if a.out:
        write_text_atomic(json.dumps(rows, indent=1) + "\n", Path(a.out) / "latent_probe.json")


if __name__ == "__main__":
    main()
