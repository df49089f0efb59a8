"""The papermill contract: validate a notebook's ``parameters`` cell before any heavy work."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

from lib.loading import ModelLoadError, check_available
from lib.speed import CHECKPOINTING


class ParameterError(ValueError):
    """A notebook parameter has the wrong type, range or value; the message names it."""


@dataclass(frozen=True)
class Param:
    """What one parameter may hold."""

    type: type | tuple[type, ...]
    low: float | None = None
    high: float | None = None
    choices: Sequence[Any] | None = None
    items: type | tuple[type, ...] | None = None  # element type when ``type`` is list
    min_len: int = 0
    optional: bool = False  # None allowed
    check: Callable[[Any], None] | None = None  # extra check, raises ValueError with a message

    def validate(self, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if isinstance(value, tuple) and self.type is list:
            value = list(value)
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if float in types and int not in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # papermill's -p 4 means 4.0 for a float parameter
        if isinstance(value, bool) and bool not in types or not isinstance(value, self.type):
            raise ParameterError(f"{name}: expected {_tname(self.type)}, got {value!r} ({type(value).__name__})")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):  # inf passed any parameter without a high bound
                raise ParameterError(f"{name}: {v!r} is not a valid value (finite numbers only)")
        if self.min_len and len(value) < self.min_len:
            raise ParameterError(f"{name}: needs at least {self.min_len} item(s), got {value!r}")
        if self.items is not None:
            for v in value:
                if isinstance(v, bool) or not isinstance(v, self.items):
                    raise ParameterError(f"{name}: every item must be {_tname(self.items)}, got {v!r}")
        for v in value if self.items is not None else [value]:
            if self.low is not None and v < self.low or self.high is not None and v > self.high:
                where = (f"is outside [{self.low}, {self.high}]" if None not in (self.low, self.high)
                         else f"is below the minimum {self.low}" if self.high is None
                         else f"is above the maximum {self.high}")
                raise ParameterError(f"{name}: {v!r} {where}")
        if self.choices is not None and value not in self.choices:
            raise ParameterError(f"{name}: {value!r} is not one of {', '.join(map(repr, self.choices))}")
        if self.check is not None:
            try:
                self.check(value)
            except (ValueError, ModelLoadError) as err:
                raise ParameterError(f"{name}: {err}") from None
        return value


def _device_name(value: str) -> None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether this machine has it:
    :func:`lib.loading.resolve_device`, before the weights load)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
        raise ValueError(f"{value!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")


def _known_model(value: str) -> None:
    """A preset, twin, folder or hub id (``ModelLoadError`` with the list of presets), and, for a hub id with the hub
    switched off, one the local cache holds."""
    check_available(value)


def distinct(values: Sequence, why: str = "each is one run") -> None:
    """``ValueError`` naming the items of ``values`` that repeat (a repeated seed would count one result twice)."""
    values = list(values)
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise ValueError(f"{values} repeat {twice}: {why}; give each once")


def _writable_folder(value: str) -> None:
    """An output folder that is, or can become, a writable folder (a relative one from the repo root): checked before
    any heavy work, since the first write comes after it (``lib.paths.output_dir`` creates the folder later)."""
    import os

    from lib.paths import in_repo

    if value == "":
        return  # the default folder, as None (lib.paths.output_dir)
    path = in_repo(value)
    existing = path
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except OSError as err:  # a parent this user cannot read
        raise ValueError(f"{value!r} cannot be reached ({type(err).__name__}: {err}): give a folder this user can "
                         "write") from None
    if not existing.is_dir():
        what = "is a file" if existing == path else f"lies under the file {existing}"
        raise ValueError(f"{value!r} {what}, not a folder: give a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{value!r}: {existing} is not writable: give a folder this user can write")


SEED_MAX = 2**63 - 1  # the largest seed torch's generators, numpy and an int64 table column all take (2**64 failed late)


def seed_list() -> Param:
    """A list of seeds: at least one, none repeated, each in [0, ``SEED_MAX``]."""
    return Param(list, items=int, low=0, high=SEED_MAX, min_len=1, check=distinct)


def seed_value() -> Param:
    """One seed in [0, ``SEED_MAX``]."""
    return Param(int, low=0, high=SEED_MAX)

# Parameters that several notebooks share; a notebook passes its own extras to ``validate``.
COMMON: dict[str, Param] = {
    "MODEL": Param(str, check=_known_model),
    "DEVICE": Param(str, check=_device_name),
    "DTYPE": Param(str, choices=("auto", "float32", "float16", "bfloat16")),
    "SEEDS": seed_list(),
    "STEPS": Param(int, low=1, high=999),  # 999: the most DDIM steps SD's 1000-step schedule holds (steps_offset 1)
    "GUIDANCE": Param(float, low=1.0, high=50.0),  # below 1 diffusers turns guidance off (lib.sampling)
    "BATCH_SIZE": Param(int, low=1, high=4096),
    "CHECKPOINTING": Param(str, choices=tuple(m for m in CHECKPOINTING if m), optional=True),  # lib.speed.save_memory
    "OUTPUT_DIR": Param(str, optional=True, check=_writable_folder),
    "FIGURES_DIR": Param(str, optional=True, check=_writable_folder),
}


def has_placeholder(name: str) -> Callable[[str], None]:
    """A ``check`` for template strings: the value must contain ``{name}``."""
    def check(value: str) -> None:
        if "{" + name + "}" not in value:
            raise ValueError(f"must contain '{{{name}}}', got {value!r}")
    return check


def toy_world(*parts: str) -> Callable[[Any], None]:
    """A ``check``: the value names a toy-world folder (``"toy"`` or a path from the repo root,
    :func:`lib.paths.resolve_toy_folder`) holding the sub-folders ``parts``."""
    def check(value: Any) -> None:
        from lib.paths import resolve_toy_folder

        folder = resolve_toy_folder(value)
        if not folder.is_dir():
            raise ValueError(f"not a toy-world folder: {value!r} (use 'toy' or a folder written by lib.toy.train)")
        missing = [p for p in parts if not (folder / p).is_dir()]
        if missing:
            raise ValueError(f"{value!r} has no {missing[0]}/ folder")
    return check


def check_step(P: SimpleNamespace, name: str, inclusive: bool = False) -> None:
    """``P.<name>``, a denoising-step index, must be below ``P.STEPS`` (or equal, with ``inclusive``)."""
    value = getattr(P, name)
    if value is not None and (value > P.STEPS if inclusive else value >= P.STEPS):
        raise ParameterError(f"{name}={value} must be {'<=' if inclusive else '<'} STEPS={P.STEPS}")


def positive(value: Any) -> None:
    """A ``check``: the value (every item of a list) must be > 0 (``low`` is inclusive)."""
    bad = [v for v in (value if isinstance(value, list) else [value]) if not v > 0]
    if bad:
        raise ValueError(f"must be > 0, got {bad[0]!r}")


def interval(value: Any) -> None:
    """A ``check``: a (low, high) pair of finite numbers with low < high."""
    if not (len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                    for v in value) and value[0] < value[1]):
        raise ValueError(f"must be a (low, high) pair of numbers with low < high, got {tuple(value)!r}")


def check_fields(obj: Any, **specs: Param) -> None:
    """Check the fields of a settings object (a search's dataclass) as parameters: ``ParameterError`` naming
    ``<Class>.<field>``, its value and what is valid, when the object is made (before any work)."""
    for name, spec in specs.items():
        spec.validate(f"{type(obj).__name__}.{name}", getattr(obj, name))


def check_disjoint(P: SimpleNamespace, name: str, other: str, why: str) -> None:
    """``P.<name>`` and ``P.<other>`` (lists) must share no item; ``ParameterError`` naming the shared ones."""
    both = sorted(set(getattr(P, name)) & set(getattr(P, other)))
    if both:
        raise ParameterError(f"{name} and {other} share {both}: {why}")


def validate(values: Mapping[str, Any], **extra: Param | None) -> SimpleNamespace:
    """Check ``values`` (the notebook's parameters) against ``COMMON`` plus ``extra``; return them as a namespace.

    Unknown names are an error too, so a misspelt papermill ``-p`` is caught instead of silently ignored; a notebook
    passes ``NAME=None`` for a ``COMMON`` parameter it does not take, which is then unknown as well (a ``-p DTYPE``
    that the notebook would never read).
    """
    specs = {k: v for k, v in {**COMMON, **extra}.items() if v is not None}
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ParameterError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(specs))}")
    P = SimpleNamespace(**{k: specs[k].validate(k, v) for k, v in values.items()})
    message = toy_sampling_warning(P)
    if message:
        warnings.warn(message, ToySettingsWarning, stacklevel=2)
    return P


class ToySettingsWarning(UserWarning):
    """A real model met the toy world's settings or parts (its step count, classifiers, LM or probe captions): the
    numbers run but say little about that model. Launched worker processes other than the first silence it (the
    same words from every process)."""


REAL_MIN_STEPS = 20  # fewer DDIM steps than this on Stable Diffusion give visibly unfinished images


def toy_sampling_warning(P: SimpleNamespace) -> str | None:
    """A warning when a model that is neither the toy world nor a shape twin is sampled with fewer than
    :data:`REAL_MIN_STEPS` steps, as the toy defaults are (8–15 steps, guidance 4): the images, and every number read
    from them, are then not those of the model as it is used."""
    from lib.loading import is_stand_in

    model, steps = getattr(P, "MODEL", None), getattr(P, "STEPS", None)
    if model is None or steps is None or steps >= REAL_MIN_STEPS:
        return None
    if is_stand_in(model):
        return None
    guidance = getattr(P, "GUIDANCE", None)
    return (f"MODEL={model!r} is sampled with STEPS={steps}{f', GUIDANCE={guidance}' if guidance is not None else ''} "
            "(the toy world's small settings); Stable Diffusion is usually sampled with -p STEPS 50 -p GUIDANCE 7.5")


def _tname(t: type | tuple[type, ...]) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__
