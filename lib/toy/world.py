"""A procedural 64×64 text-to-image world whose truth is known.

Every image is rendered from a :class:`Scene` (object, color, style, action, named character, background) with small
random jitter drawn from a ``numpy.random.Generator``: the same seed reproduces the same bytes.  Captions come from a
small template grammar with paraphrases; :func:`parse_caption` inverts it exactly.

Vocabulary (every word is a whole CLIP BPE token except ``"r2d2"``, which CLIP splits into r/2/d/2)::

    objects     circle square triangle star heart diamond dog cat fish robot
    colors      red green blue yellow purple orange pink white
    styles      "van gogh" monet picasso "pixel art" painting      (None: flat clean render)
    actions     jumping sleeping spinning                          (None: centred, upright)
    characters  snoopy r2d2 nemo "grumpy cat"                      (fix object and color)
    backgrounds "on a beach" "in a city"                           (None: plain light-grey background)

Held-out combinations (:data:`HELDOUT`, never produced by ``sample_scene(rng, "train")``) are ~10 % of the pairs of
each kind listed there; every single attribute value still occurs in training.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64

OBJECTS = ("circle", "square", "triangle", "star", "heart", "diamond", "dog", "cat", "fish", "robot")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "white")
STYLES = ("van gogh", "monet", "picasso", "pixel art", "painting")
NAMED_STYLES = STYLES[:4]  # the artists/techniques; "painting" is the generic style
ACTIONS = ("jumping", "sleeping", "spinning")
CHARACTERS = ("snoopy", "r2d2", "nemo", "grumpy cat")
BACKGROUNDS = ("on a beach", "in a city")
CHARACTER_OBJECT: dict[str, str] = {"snoopy": "dog", "r2d2": "robot", "nemo": "fish", "grumpy cat": "cat"}
PREFIXES = ("a photo of a", "an image of a", "a picture of a")

ATTRIBUTES = ("object", "color", "style", "action", "character", "background")
VOCAB: dict[str, tuple[str, ...]] = {
    "object": OBJECTS,
    "color": COLORS,
    "style": STYLES,
    "action": ACTIONS,
    "character": CHARACTERS,
    "background": BACKGROUNDS,
}

# Held-out pairs: never sampled with split="train".  ("style", "object") pairs only apply to generic objects (no
# character); ("character", "style") pairs hold out a character in a style.
HELDOUT: dict[tuple[str, str], frozenset[tuple[str, str]]] = {
    ("color", "object"): frozenset(  # 8 of 80 pairs, each color once
        {
            ("red", "triangle"),
            ("green", "cat"),
            ("blue", "star"),
            ("yellow", "robot"),
            ("purple", "dog"),
            ("orange", "heart"),
            ("pink", "fish"),
            ("white", "diamond"),
        }
    ),
    ("style", "object"): frozenset(  # 5 of 50 pairs, each style once
        {
            ("van gogh", "cat"),
            ("monet", "robot"),
            ("picasso", "dog"),
            ("pixel art", "heart"),
            ("painting", "fish"),
        }
    ),
    ("character", "style"): frozenset({("snoopy", "van gogh"), ("nemo", "picasso")}),  # 2 of 20 pairs
}

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 75, 225),
    "yellow": (250, 215, 25),
    "purple": (140, 45, 185),
    "orange": (250, 125, 15),
    "pink": (250, 135, 190),
    "white": (250, 250, 250),
}
_DARK = (20, 20, 24)
_LIGHT = (250, 250, 250)
_PLAIN_BG = (168, 172, 176)  # light-ish neutral grey: every fill color differs from it in hue or lightness


def _vocab_message() -> str:
    return "; ".join(f"{a}s: {', '.join(repr(v) for v in VOCAB[a])}" for a in ATTRIBUTES)


@dataclass(frozen=True)
class Scene:
    """Labels of one image; ``None`` where an attribute is absent.  A character fills in its generic object."""

    object: str | None = None
    color: str | None = None
    style: str | None = None
    action: str | None = None
    character: str | None = None
    background: str | None = None

    def __post_init__(self):
        if self.character is not None and self.object is None and self.character in CHARACTER_OBJECT:
            object.__setattr__(self, "object", CHARACTER_OBJECT[self.character])
        self.validate()

    def validate(self) -> "Scene":
        for name in ATTRIBUTES:
            value = getattr(self, name)
            if value is not None and value not in VOCAB[name]:
                raise ValueError(f"unknown {name} {value!r}. Valid vocabulary: {_vocab_message()}")
        if self.object is None:
            raise ValueError(f"a scene needs an object or a character. Valid vocabulary: {_vocab_message()}")
        if self.character is not None:
            if self.color is not None:
                raise ValueError(
                    f"character {self.character!r} has a fixed color; got color={self.color!r}. "
                    f"Characters take actions, styles and backgrounds only. Valid vocabulary: {_vocab_message()}"
                )
            if self.object != CHARACTER_OBJECT[self.character]:
                raise ValueError(
                    f"character {self.character!r} is a {CHARACTER_OBJECT[self.character]}, not a {self.object!r}"
                )
        return self

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def heldout_pairs(scene: Scene) -> list[tuple[str, str, str, str]]:
    """The held-out pairs this scene contains, as (attribute, value, attribute, value)."""
    out = []
    for (a, b), pairs in HELDOUT.items():
        if a == "style" and b == "object" and scene.character is not None:
            continue
        va, vb = getattr(scene, a), getattr(scene, b)
        if (va, vb) in pairs:
            out.append((a, va, b, vb))
    return out


def is_heldout(scene: Scene) -> bool:
    return bool(heldout_pairs(scene))


# ----------------------------------------------------------------------------------------------------------- glyphs
def _ell(cx, cy, rx, ry, n=20, a0=0.0, a1=2 * np.pi):
    t = np.linspace(a0, a1, n, endpoint=(a1 - a0) < 2 * np.pi - 1e-6)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _rect(x0, y0, x1, y1):
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], float)


def _poly(*pts):
    return np.array(pts, float)


def _ellipse_band(cx, cy, rx, ry, x0, x1, n=8):
    """Vertical band x0..x1 of an ellipse (for nemo's stripes)."""
    xs = np.linspace(x0, x1, n)
    h = ry * np.sqrt(np.clip(1 - ((xs - cx) / rx) ** 2, 0, 1))
    return np.concatenate([np.stack([xs, cy - h], 1), np.stack([xs[::-1], cy + h[::-1]], 1)])


def _star(n=5, ro=1.0, ri=0.42):
    a = -np.pi / 2 + np.arange(2 * n) * np.pi / n
    r = np.where(np.arange(2 * n) % 2 == 0, ro, ri)
    return np.stack([r * np.cos(a), r * np.sin(a) + 0.08], 1)


def _heart():
    t = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x / 16.5, -y / 16.5 + 0.1], 1)


# Each glyph: list of (kind, role, points[, width]); kind "poly" or "line"; role in body/shade/dark/light/accent.
_DOG = [
    ("line", "body", _poly((-0.7, 0.0), (-0.92, -0.45)), 3),  # tail
    ("poly", "body", _ell(-0.15, 0.12, 0.6, 0.3)),
    ("poly", "body", _rect(-0.62, 0.25, -0.46, 0.82)),
    ("poly", "body", _rect(-0.38, 0.25, -0.22, 0.82)),
    ("poly", "body", _rect(0.08, 0.25, 0.24, 0.82)),
    ("poly", "body", _rect(0.3, 0.25, 0.46, 0.82)),
    ("poly", "body", _ell(0.55, -0.32, 0.32, 0.3)),
    ("poly", "body", _ell(0.86, -0.22, 0.2, 0.13)),
    ("poly", "ear", _ell(0.38, -0.24, 0.11, 0.27)),
    ("poly", "dark", _ell(0.63, -0.4, 0.07, 0.07, 8)),
    ("poly", "dark", _ell(1.02, -0.25, 0.08, 0.07, 8)),
]
_CAT = [
    ("line", "body", _poly((0.35, 0.85), (0.8, 0.75), (0.92, 0.3)), 3),  # tail
    ("poly", "body", _ell(0.0, 0.45, 0.5, 0.5)),
    ("poly", "body", _poly((-0.42, -0.42), (-0.36, -0.98), (-0.04, -0.64))),
    ("poly", "body", _poly((0.42, -0.42), (0.36, -0.98), (0.04, -0.64))),
    ("poly", "body", _ell(0.0, -0.3, 0.44, 0.38)),
    ("poly", "shade", _poly((-0.32, -0.52), (-0.33, -0.84), (-0.14, -0.62))),
    ("poly", "shade", _poly((0.32, -0.52), (0.33, -0.84), (0.14, -0.62))),
    ("poly", "dark", _ell(-0.17, -0.36, 0.07, 0.1, 8)),
    ("poly", "dark", _ell(0.17, -0.36, 0.07, 0.1, 8)),
    ("poly", "dark", _poly((-0.07, -0.2), (0.07, -0.2), (0.0, -0.13))),
    ("line", "dark", _poly((-0.1, -0.15), (-0.6, -0.22)), 1),
    ("line", "dark", _poly((0.1, -0.15), (0.6, -0.22)), 1),
]
_FISH = [
    ("poly", "body", _poly((-0.42, 0.0), (-0.95, -0.48), (-0.95, 0.48))),
    ("poly", "body", _poly((-0.1, -0.3), (0.3, -0.3), (0.0, -0.68))),
    ("poly", "body", _ell(0.1, 0.0, 0.68, 0.4)),
    ("poly", "dark", _ell(0.52, -0.1, 0.08, 0.08, 8)),
    ("line", "shade", _poly((0.1, 0.12), (0.3, 0.02)), 1),
]
_ROBOT = [
    ("line", "dark", _poly((0.0, -0.85), (0.0, -1.0)), 1),
    ("poly", "dark", _ell(0.0, -1.0, 0.08, 0.08, 8)),
    ("poly", "body", _rect(-0.4, -0.86, 0.4, -0.36)),
    ("poly", "body", _rect(-0.52, -0.3, 0.52, 0.45)),
    ("poly", "body", _rect(-0.8, -0.25, -0.58, 0.3)),
    ("poly", "body", _rect(0.58, -0.25, 0.8, 0.3)),
    ("poly", "body", _rect(-0.36, 0.5, -0.1, 0.95)),
    ("poly", "body", _rect(0.1, 0.5, 0.36, 0.95)),
    ("poly", "dark", _rect(-0.26, -0.72, -0.1, -0.56)),
    ("poly", "dark", _rect(0.1, -0.72, 0.26, -0.56)),
    ("poly", "dark", _rect(-0.2, -0.48, 0.2, -0.42)),
    ("poly", "shade", _rect(-0.22, -0.15, 0.22, 0.18)),
]
GLYPHS: dict[str, list] = {
    "circle": [("poly", "body", _ell(0, 0, 0.9, 0.9, 32))],
    "square": [("poly", "body", _rect(-0.78, -0.78, 0.78, 0.78))],
    "triangle": [("poly", "body", _poly((0, -0.95), (0.95, 0.8), (-0.95, 0.8)))],
    "star": [("poly", "body", _star())],
    "heart": [("poly", "body", _heart())],
    "diamond": [("poly", "body", _poly((0, -1.0), (0.68, 0), (0, 1.0), (-0.68, 0)))],
    "dog": _DOG,
    "cat": _CAT,
    "fish": _FISH,
    "robot": _ROBOT,
}
# characters: (glyph, {role: rgb})
_GRUMPY = _CAT[:-2] + [
    ("poly", "shade", _ell(0.0, -0.2, 0.22, 0.14)),
    ("poly", "dark", _poly((-0.07, -0.24), (0.07, -0.24), (0.0, -0.17))),
    ("line", "dark", _poly((-0.2, -0.02), (-0.08, -0.1), (0.08, -0.1), (0.2, -0.02)), 2),  # frown
    ("line", "dark", _poly((-0.32, -0.52), (-0.08, -0.44)), 2),  # angry brows
    ("line", "dark", _poly((0.32, -0.52), (0.08, -0.44)), 2),
]
_R2D2 = [
    ("poly", "body", _rect(-0.82, -0.2, -0.55, 0.88)),
    ("poly", "body", _rect(0.55, -0.2, 0.82, 0.88)),
    ("poly", "accent", _ell(0.0, -0.35, 0.52, 0.55, 16, np.pi, 2 * np.pi)),
    ("poly", "body", _rect(-0.52, -0.35, 0.52, 0.65)),
    ("poly", "body", _poly((-0.35, 0.65), (0.35, 0.65), (0.25, 0.9), (-0.25, 0.9))),
    ("poly", "dark", _ell(0.12, -0.6, 0.09, 0.09, 8)),
    ("poly", "accent", _rect(-0.35, -0.18, -0.05, 0.15)),
    ("poly", "accent", _rect(0.08, -0.18, 0.35, -0.05)),
    ("poly", "accent", _rect(0.08, 0.02, 0.35, 0.12)),
    ("poly", "accent", _rect(-0.3, 0.32, 0.3, 0.45)),
]
_NEMO = _FISH[:3] + [
    ("poly", "light", _ellipse_band(0.1, 0.0, 0.68, 0.4, 0.3, 0.44)),
    ("poly", "light", _ellipse_band(0.1, 0.0, 0.68, 0.4, -0.18, -0.04)),
    ("poly", "light", _poly((-0.62, -0.16), (-0.72, -0.26), (-0.72, 0.26), (-0.62, 0.16))),
    ("poly", "dark", _ell(0.6, -0.1, 0.07, 0.07, 8)),
]
CHARACTER_GLYPHS: dict[str, tuple[list, dict]] = {
    "snoopy": (_DOG[:8] + [("poly", "dark", _ell(-0.25, 0.0, 0.22, 0.14)), ("poly", "dark", _ell(0.38, -0.24, 0.12, 0.28))] + _DOG[9:],
               {"body": RGB["white"]}),
    "r2d2": (_R2D2, {"body": RGB["white"], "accent": (40, 90, 215)}),
    "nemo": (_NEMO, {"body": (250, 115, 10)}),
    "grumpy cat": (_GRUMPY, {"body": (150, 122, 96), "shade": (95, 72, 55)}),
}


# ------------------------------------------------------------------------------------------------------- rendering
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def _background(kind: str | None, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), _PLAIN_BG)
    if kind is None:
        return img
    d = ImageDraw.Draw(img)
    if kind == "on a beach":
        d.rectangle([0, 0, SIZE, SIZE], fill=(110, 185, 240))
        horizon = 40 + int(rng.integers(-2, 3))
        d.rectangle([0, horizon - 4, SIZE, horizon], fill=(40, 110, 190))  # sea
        d.rectangle([0, horizon, SIZE, SIZE], fill=(232, 206, 140))  # sand: lower third
        sx = int(rng.integers(4, 60))
        d.ellipse([sx - 4, 3, sx + 4, 11], fill=(255, 240, 120))  # sun
    elif kind == "in a city":
        d.rectangle([0, 0, SIZE, SIZE], fill=(205, 212, 222))
        x = -int(rng.integers(0, 6))
        while x < SIZE:
            w = int(rng.integers(8, 15))
            top = int(rng.integers(18, 42))
            grey = int(rng.integers(80, 125))
            d.rectangle([x, top, x + w - 1, SIZE], fill=(grey, grey, grey + 8))
            for wy in range(top + 3, SIZE - 2, 5):
                for wx in range(x + 2, x + w - 3, 4):
                    d.rectangle([wx, wy, wx + 1, wy + 1], fill=(225, 220, 150))
            x += w + int(rng.integers(0, 3))
    return img


def _draw_object(img: Image.Image, glyph, colors: dict, cx, cy, r, angle_deg) -> tuple:
    """Draw the glyph (unit coordinates, y down) scaled by r, rotated, centred at (cx, cy); returns its bbox."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    prims = [(kind, role, (pts @ rot.T) * r + (cx, cy), rest) for kind, role, pts, *rest in glyph]
    mask = Image.new("L", (SIZE, SIZE), 0)
    dm = ImageDraw.Draw(mask)
    for kind, role, pts, rest in prims:
        xy = pts.ravel().tolist()
        if kind == "poly":
            dm.polygon(xy, fill=255)
        else:
            dm.line(xy, fill=255, width=max(1, int(round(rest[0] * r / 17))))
    m = np.asarray(mask)
    dil = m.copy()  # 3×3 dilation: a 1-px dark outline keeps every color visible on every background
    dil[1:] |= m[:-1]
    dil[:-1] |= m[1:]
    d2 = dil.copy()
    d2[:, 1:] |= dil[:, :-1]
    d2[:, :-1] |= dil[:, 1:]
    img.paste(_DARK, mask=Image.fromarray(d2))
    d = ImageDraw.Draw(img)
    for kind, role, pts, rest in prims:
        xy = pts.ravel().tolist()
        fill = colors[role]
        if kind == "poly":
            d.polygon(xy, fill=fill)
        else:
            d.line(xy, fill=fill, width=max(1, int(round(rest[0] * r / 17))))
    allp = np.concatenate([p for _, _, p, _ in prims])
    return allp.min(0), allp.max(0)


def _colors_for(scene: Scene, rng: np.random.Generator) -> tuple[list, dict]:
    if scene.character is not None:
        glyph, cmap = CHARACTER_GLYPHS[scene.character]
        body = cmap["body"]
    else:
        glyph = GLYPHS[scene.object]
        color = scene.color
        if color is None:  # unspecified: any color that is not a held-out pair with this object
            allowed = [c for c in COLORS if (c, scene.object) not in HELDOUT[("color", "object")]]
            color = allowed[int(rng.integers(len(allowed)))]
        body = RGB[color]
        cmap = {}
    shade = tuple(int(v * 0.62) for v in body)
    colors = {"body": body, "shade": shade, "ear": shade, "dark": _DARK, "light": _LIGHT, "accent": body}
    colors.update(cmap)
    if scene.character == "snoopy":
        colors["ear"] = _DARK
    return glyph, colors


def _render_flat(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    img = _background(scene.background, rng)
    glyph, colors = _colors_for(scene, rng)
    jx, jy = rng.uniform(-3, 3, 2)
    r = 16.5 * rng.uniform(0.9, 1.1)
    rot = rng.uniform(-10, 10)
    d = ImageDraw.Draw(img)
    if scene.action is None:
        _draw_object(img, glyph, colors, 32 + jx, 32 + jy, r, rot)
    elif scene.action == "jumping":
        r *= 0.88
        cx, cy = 32 + jx, 19 + jy * 0.5
        _draw_object(img, glyph, colors, cx, cy, r, rot)
        y0 = cy + r + 3
        for dx in (-9, 0, 9):
            d.line([(cx + dx, y0), (cx + dx, y0 + 8)], fill=_DARK, width=2)
    elif scene.action == "sleeping":
        r *= 0.82
        cx, cy = 32 + jx - 4, SIZE - 1.08 * r - 2 + jy * 0.3
        _draw_object(img, glyph, colors, cx, cy, r, 90 + rot * 0.5)
        for zx, zy, s in ((cx + r - 1, cy - r - 2, 6), (cx + r + 7, cy - r - 10, 4)):
            zx, zy = min(zx, SIZE - s - 1), max(zy, 1)
            d.line([(zx, zy), (zx + s, zy), (zx, zy + s), (zx + s, zy + s)], fill=_DARK, width=1)
    elif scene.action == "spinning":
        cx, cy = 32 + jx, 32 + jy
        r *= 0.85
        _draw_object(img, glyph, colors, cx, cy, r, 45 + rot)
        q = r * 1.3 + 3
        a0 = rng.uniform(0, 40)
        for s in (a0, a0 + 180):
            d.arc([cx - q, cy - q, cx + q, cy + q], s, s + 70, fill=_DARK, width=2)
            e = np.deg2rad(s + 70)  # little arrow head at the end of each arc
            ex, ey = cx + q * np.cos(e), cy + q * np.sin(e)
            d.polygon(_arrow(ex, ey, e), fill=_DARK)
    return np.asarray(img, dtype=np.float32)


def _arrow(x, y, a):
    t = np.array([-np.sin(a), np.cos(a)])  # tangent (direction of travel)
    n = np.array([np.cos(a), np.sin(a)])
    tip = np.array([x, y]) + 3.5 * t
    return [tuple(tip), tuple(np.array([x, y]) + 3 * n), tuple(np.array([x, y]) - 3 * n)]


def _gather(img, sy, sx):
    return img[np.clip(sy, 0, SIZE - 1).astype(np.intp), np.clip(sx, 0, SIZE - 1).astype(np.intp)]


def _box_blur(img, k):
    out = np.zeros_like(img)
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            out += np.roll(img, (dy, dx), (0, 1))
    return out / (2 * k + 1) ** 2


def _van_gogh(img, rng):
    c = rng.uniform(4, 60, (3, 2)).astype(np.float32)
    dx = _XX[None] - c[:, 0, None, None]
    dy = _YY[None] - c[:, 1, None, None]
    dist = np.sqrt(dx * dx + dy * dy)
    k = dist.argmin(0)
    dk = np.take_along_axis(dist, k[None], 0)[0]
    th = np.arctan2(np.take_along_axis(dy, k[None], 0)[0], np.take_along_axis(dx, k[None], 0)[0])
    phase = 1.1 * dk + 3 * th + rng.uniform(0, 6.3)
    s = np.sin(phase)
    # displace along the swirl (strokes follow concentric spirals), then stripe the brightness
    tx, ty = -np.sin(th), np.cos(th)
    out = 0.5 * (_gather(img, _YY + 1.6 * ty * s, _XX + 1.6 * tx * s) + _gather(img, _YY - 1.6 * ty, _XX - 1.6 * tx))
    out = out * (0.84 + 0.16 * s[..., None]) + s[..., None] * np.array([12, 10, -16], np.float32)
    return out


def _monet(img, rng):
    soft = _box_blur(img, 1)
    pastel = 0.62 * soft + 0.38 * np.array([238, 232, 242], np.float32)
    n = 420
    ys, xs = rng.integers(0, SIZE - 1, n), rng.integers(0, SIZE - 1, n)
    dots = pastel[ys, xs] + rng.normal(0, 22, (n, 3)).astype(np.float32) + 18
    out = pastel.copy()
    for oy, ox in ((0, 0), (0, 1), (1, 0), (1, 1)):
        out[ys + oy, xs + ox] = dots
    return out


def _picasso(img, rng):
    n_lines = 4
    p = rng.uniform(12, 52, (n_lines, 2)).astype(np.float32)
    ang = rng.uniform(0, np.pi, n_lines).astype(np.float32)
    nx, ny = np.cos(ang), np.sin(ang)
    dist = (_XX[None] - p[:, 0, None, None]) * nx[:, None, None] + (_YY[None] - p[:, 1, None, None]) * ny[:, None, None]
    code = ((dist > 0).astype(np.int64) << np.arange(n_lines)[:, None, None]).sum(0)
    n_reg = 1 << n_lines
    shift = rng.integers(-4, 5, (n_reg, 2))
    gain = rng.uniform(0.6, 1.3, n_reg).astype(np.float32)
    tint = rng.uniform(-30, 30, (n_reg, 3)).astype(np.float32) + np.array([12, 0, -18], np.float32)
    out = _gather(img, _YY - shift[code, 1], _XX - shift[code, 0])
    out = out * gain[code][..., None] + tint[code]
    out = 16 * np.round(out / 16)  # flat facet tones
    edge = (np.abs(dist) < 0.75).any(0)
    out[edge] = (45, 35, 30)
    return out


def _pixel_art(img, rng, block=4):
    b = 0.5 * img[block // 2 :: block, block // 2 :: block] + 0.5 * img[block // 2 - 1 :: block, block // 2 - 1 :: block]
    b = np.round(b / 51.0) * 51.0  # 6 levels per channel: a 216-color web palette
    out = np.repeat(np.repeat(b, block, 0), block, 1)
    grid = ((_XX % block) == 0) | ((_YY % block) == 0)
    out[grid] *= 0.88
    return out


_STROKE_DIRS = ((0, 1), (1, 1), (1, 0), (1, -1))


def _stroke_bank() -> np.ndarray:
    """Fixed brush-stroke textures (noise smeared along each of 4 directions), drawn once from a fixed seed."""
    noise = np.random.default_rng(1234).standard_normal((4, SIZE, SIZE)).astype(np.float32)
    return np.stack(
        [sum(np.roll(noise[i], (k * dy, k * dx), (0, 1)) for k in range(-4, 5)) / 3.0 for i, (dy, dx) in enumerate(_STROKE_DIRS)]
    )


_STROKES = _stroke_bank()


def _painting(img, rng):
    patch = rng.integers(0, 4, (SIZE // 16, SIZE // 16))
    sel = np.repeat(np.repeat(patch, 16, 0), 16, 1)
    oy, ox = rng.integers(0, SIZE, 2)
    tex = np.take_along_axis(np.roll(_STROKES, (int(oy), int(ox)), (1, 2)), sel[None], 0)[0]
    smear = np.empty_like(img)
    for i, (dy, dx) in enumerate(_STROKE_DIRS):
        m = sel == i
        if m.any():
            s = (np.roll(img, (2 * dy, 2 * dx), (0, 1)) + img + np.roll(img, (-2 * dy, -2 * dx), (0, 1))) / 3.0
            smear[m] = s[m]
    canvas = (((_XX.astype(int) // 2) + (_YY.astype(int) // 2)) % 2) * 8.0 - 4.0
    return smear * (1.0 + 0.13 * tex[..., None]) + canvas[..., None]


_STYLE_FN = {"van gogh": _van_gogh, "monet": _monet, "picasso": _picasso, "pixel art": _pixel_art, "painting": _painting}


def render(scene: Scene, rng: np.random.Generator | int) -> Image.Image:
    """Render ``scene`` as a 64×64 RGB image; the jitter comes from ``rng`` (a Generator, or an int seed)."""
    return Image.fromarray(_render_array(scene, _as_rng(rng)))


def _render_array(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    if not isinstance(scene, Scene):
        raise TypeError(f"render() needs a Scene, got {type(scene).__name__}")
    img = _render_flat(scene, rng)
    if scene.style is not None:
        img = _STYLE_FN[scene.style](img, rng)
    img = img + 3.0 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _cores(scene: Scene) -> list[tuple[str, bool]]:
    """Noun phrases (without article) with their action, and whether they need an article."""
    if scene.character is not None:
        base, art = scene.character, False
    else:
        base, art = (f"{scene.color} {scene.object}" if scene.color else scene.object), True
    if scene.action is None:
        cores = [base]
    elif scene.character is not None:
        cores = [f"{base} {scene.action}"]
    else:
        cores = [f"{base} {scene.action}", f"{scene.action} {base}"]
    if scene.background is not None:
        cores = [f"{c} {scene.background}" for c in cores]
    return [(c, art) for c in cores]


def _np(core: str, art: bool) -> str:
    return f"{_article(core)} {core}" if art else core


def captions(scene: Scene) -> list[str]:
    """Every phrasing the grammar has for ``scene``."""
    scene.validate()
    out = []
    for core, art in _cores(scene):
        np_ = _np(core, art)
        bases = [f"{p[:-2]} {np_}" for p in PREFIXES] + [np_]  # "a photo of" + "an orange star"
        if scene.style is None:
            out += bases
        elif scene.style == "painting":
            out.append(f"a painting of {np_}")
        else:
            s = scene.style
            out += [f"{b}, in the style of {s}" for b in bases]
            out.append(f"a {s} painting of {np_}")
            out += [f"{b} painted by {s}" for b in bases]
    return out


def caption(scene: Scene, rng: np.random.Generator | int) -> str:
    """One phrasing of ``scene`` chosen with ``rng``."""
    opts = captions(scene)
    return opts[int(_as_rng(rng).integers(len(opts)))]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def _unknown(kind: str, words: str, text: str) -> ValueError:
    return ValueError(f"cannot parse {kind} {words!r} in caption {text!r}. Valid vocabulary: {_vocab_message()}")


def parse_caption(text: str) -> Scene:
    """Invert the caption grammar: ``parse_caption(caption(scene, rng)) == scene`` for every scene."""
    if not isinstance(text, str):
        raise TypeError(f"parse_caption needs a str, got {type(text).__name__}")
    s = _norm(text)
    if not s:
        raise ValueError(f"empty caption. Valid vocabulary: {_vocab_message()}")
    style = None
    if m := re.fullmatch(r"(.+?),? in the style of (.+)", s):
        s, style = m.group(1), m.group(2)
        if style not in NAMED_STYLES:
            raise _unknown("style", style, text)
    elif m := re.fullmatch(r"(.+) painted by (.+)", s):
        s, style = m.group(1), m.group(2)
        if style not in NAMED_STYLES:
            raise _unknown("style", style, text)
    elif s.startswith("a painting of "):
        s, style = s[len("a painting of ") :], "painting"
    elif m := re.fullmatch(r"an? (.+?) painting of (.+)", s):
        style, s = m.group(1), m.group(2)
        if style not in NAMED_STYLES:
            raise _unknown("style", style, text)
    for p in PREFIXES:
        head = p[:-2] + " "
        if s.startswith(head):
            s = s[len(head) :]
            break
    background = None
    for bg in BACKGROUNDS:
        if s.endswith(" " + bg):
            s, background = s[: -len(bg) - 1], bg
            break
    words = s.split()
    if words and words[0] in ("a", "an"):
        words = words[1:]
    action = None
    if len(words) > 1 and words[-1] in ACTIONS:
        action, words = words[-1], words[:-1]
    elif len(words) > 1 and words[0] in ACTIONS:
        action, words = words[0], words[1:]
    rest = " ".join(words)
    if rest in CHARACTERS:
        return Scene(character=rest, style=style, action=action, background=background)
    if len(words) == 1 and words[0] in OBJECTS:
        return Scene(object=words[0], style=style, action=action, background=background)
    if len(words) == 2 and words[0] in COLORS and words[1] in OBJECTS:
        return Scene(object=words[1], color=words[0], style=style, action=action, background=background)
    if len(words) > 1 and words[0] in COLORS and " ".join(words[1:]) in CHARACTERS:
        raise ValueError(f"caption {text!r}: character {' '.join(words[1:])!r} has a fixed color, so {words[0]!r} "
                         "cannot describe it; characters take actions, styles and backgrounds only")
    for ch in CHARACTERS:
        if rest == f"{ch} {CHARACTER_OBJECT[ch]}":
            raise ValueError(f"caption {text!r}: character {ch!r} is already a {CHARACTER_OBJECT[ch]}; "
                             f"write {ch!r} alone")
    raise _unknown("subject", rest, text)


def subject_char_span(text: str, scene: Scene, attribute: str) -> tuple[int, int]:
    """Character offsets [start, end) of ``attribute``'s words in ``text`` (see :func:`subject_span`)."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; choose one of {ATTRIBUTES}")
    value = getattr(scene, attribute)
    if value is None:
        raise ValueError(f"scene has no {attribute}: {scene}")
    if attribute == "object" and scene.character is not None:
        raise ValueError(
            f"the object {value!r} of character {scene.character!r} is implied, not written; use attribute='character'"
        )
    low = text.lower()
    for m in re.finditer(r"(?<![a-z0-9])" + re.escape(value) + r"(?![a-z0-9])", low):
        if attribute == "object" and low[max(0, m.start() - 7) : m.start()] == "grumpy ":
            continue
        return m.start(), m.end()
    raise ValueError(f"{attribute} {value!r} does not occur in caption {text!r}")


def subject_span(text: str, scene: Scene, attribute: str) -> str:
    """The words of ``attribute`` in the caption, e.g. ``"van gogh"``, ``"red"``, ``"snoopy"``, ``"on a beach"``."""
    a, b = subject_char_span(text, scene, attribute)
    return text[a:b]


# -------------------------------------------------------------------------------------------------------- sampling
def _sample_any(rng: np.random.Generator) -> Scene:
    style = None if rng.random() < 0.35 else STYLES[int(rng.integers(len(STYLES)))]
    action = None if rng.random() < 0.4 else ACTIONS[int(rng.integers(len(ACTIONS)))]
    background = None if rng.random() < 0.5 else BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if rng.random() < 0.2:
        ch = CHARACTERS[int(rng.integers(len(CHARACTERS)))]
        return Scene(character=ch, style=style, action=action, background=background)
    obj = OBJECTS[int(rng.integers(len(OBJECTS)))]
    color = None if rng.random() < 0.1 else COLORS[int(rng.integers(len(COLORS)))]
    return Scene(object=obj, color=color, style=style, action=action, background=background)


def sample_scene(rng: np.random.Generator | int, split: str = "train") -> Scene:
    """A random scene: ``"train"`` never contains a :data:`HELDOUT` pair, ``"heldout"`` always does, ``"any"``."""
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split must be 'train', 'heldout' or 'any', got {split!r}")
    rng = _as_rng(rng)
    while True:
        s = _sample_any(rng)
        if split == "any" or is_heldout(s) == (split == "heldout"):
            return s


def all_scenes() -> list[Scene]:
    """Every scene the world can draw (:func:`sample_scene`'s support), in a fixed order."""
    opt = lambda values: (None, *values)  # noqa: E731 - an attribute may be left out
    rest = [(st, ac, bg) for st in opt(STYLES) for ac in opt(ACTIONS) for bg in opt(BACKGROUNDS)]
    chars = [Scene(character=ch, style=st, action=ac, background=bg) for ch in CHARACTERS for st, ac, bg in rest]
    objs = [Scene(object=ob, color=co, style=st, action=ac, background=bg)
            for ob in OBJECTS for co in opt(COLORS) for st, ac, bg in rest]
    return chars + objs


def make_dataset(n: int, seed: int, split: str = "train") -> tuple[np.ndarray, list[Scene], list[str]]:
    """``n`` samples: (uint8 array n×64×64×3, scenes, captions), reproducible from ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    scenes, caps = [], []
    for i in range(n):
        s = sample_scene(rng, split)
        images[i] = _render_array(s, rng)
        scenes.append(s)
        caps.append(caption(s, rng))
    return images, scenes, caps


def _dataset_chunk(args: tuple[int, int, int, str]):
    n, seed, k, split = args
    return make_dataset(n, seed=[seed, k], split=split)


def make_dataset_parallel(n: int, seed: int, split: str = "train", workers: int = 8,
                          chunk: int = 4096) -> tuple[np.ndarray, list[Scene], list[str]]:
    """Like :func:`make_dataset`, rendered in chunks of ``chunk`` on ``workers`` processes (chunk ``k`` draws from the
    seed ``[seed, k]``, so the result depends on ``n``, ``seed`` and ``chunk``, never on ``workers``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    jobs = [(min(chunk, n - i), seed, k, split) for k, i in enumerate(range(0, n, chunk))]
    if workers <= 1 or len(jobs) <= 1:
        parts = [_dataset_chunk(j) for j in jobs]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_dataset_chunk, jobs)
    if not parts:
        return np.empty((0, SIZE, SIZE, 3), np.uint8), [], []
    return (np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]], [c for p in parts for c in p[2]])


def label_indices(scenes: list[Scene], attribute: str) -> np.ndarray:
    """Integer labels of ``attribute`` (index into ``VOCAB[attribute]``; -1 where absent)."""
    vocab = VOCAB[attribute]
    return np.array([-1 if getattr(s, attribute) is None else vocab.index(getattr(s, attribute)) for s in scenes])


__all__ = [
    "OBJECTS", "COLORS", "STYLES", "NAMED_STYLES", "ACTIONS", "CHARACTERS", "BACKGROUNDS", "CHARACTER_OBJECT",
    "PREFIXES", "ATTRIBUTES", "VOCAB", "HELDOUT", "Scene", "render", "caption", "captions", "parse_caption",
    "subject_span", "subject_char_span", "sample_scene", "all_scenes", "make_dataset", "make_dataset_parallel", "is_heldout", "heldout_pairs",
    "label_indices", "SIZE",
]
