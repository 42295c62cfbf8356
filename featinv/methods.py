"""The registry of methods: every guidance preset and every baseline, by name, in one table.

``get_method(name, **overrides)`` builds one (``get_method("fast", weight=2.0)``),
``make_method(spec)`` also takes the YAML/dict form ``{preset: fast, name: fast-w2, weight: 2.0}``,
``list_methods()`` names them all. A new preset is one line in ``PRESETS``; a new kind of method
is a class following ``featinv.contract.Method`` plus ``register_method(name, factory)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from featinv.baselines import DeepInversion, FourierVisualization, PixelInversion
from featinv.guidance import Guidance
from featinv.specs import suggest

__all__ = ["PRESETS", "get_method", "list_methods", "make_method", "register_method", "method_config"]

_NO_REF = dict(weight=0.0, early_steps=0, clamp_k=None)  # switch off the reference's eps-space term
_ST = dict(decode_clamp="straight_through")


def _preset(cls, **defaults) -> Callable[..., Any]:
    """A factory: ``cls(**{**defaults, **overrides})``."""
    return lambda **kw: cls(**{**defaults, **kw})


PRESETS: dict[str, Callable[..., Any]] = {
    # The reference (authors' code): 1000 DDPM steps, w = 4, rescale to ||eps||, clamp k = 3,
    # K = 8 per step and K = 1000 on the first 5 steps, hard clamp of the decoded image.
    "shirahama2025": _preset(Guidance, name="shirahama2025"),
    # The same guidance on 25 trailing DDIM-ancestral steps, K = 2 recurrences per step, no early
    # window, w decaying linearly to 0: NFE 50. Chosen on validation digits as the cheapest point
    # of the cosine-vs-NFE Pareto front whose outputs the held-out digits ViT reads as the target
    # digit, within 0.001 of the cosine of the previous preset (50 steps, K = 4, K = 20 on the first
    # 3; NFE 248) (benchmarks/presets.py, benchmarks/results/presets.md).
    "fast": _preset(Guidance, name="fast", steps=25, recurrence=2, early_steps=0, early_recurrence=1,
                    schedule="linear_decay", **_ST),
    # The prior alone from the same seeds, on fast's 25 steps: the lower bound every table needs.
    "unguided": _preset(Guidance, name="unguided", steps=25, recurrence=1, **_NO_REF, **_ST),
    # DPS (Chung et al. 2023, Alg. 1): z_{t-1} -= zeta grad_{z_t} L / sqrt(L), 1000 ancestral steps.
    "dps": _preset(Guidance, name="dps", z_weight=1.0, norm="loss", recurrence=1, **_NO_REF, **_ST),
    # FreeDoM (Yu et al. 2023, Alg. 1): z-gradient scaled to the unguided step, time-travel K = 10
    # over the early-middle "semantic" stage; 100 DDIM-ancestral steps.
    "freedom": _preset(Guidance, name="freedom", steps=100, z_weight=1.0, norm="step", recurrence=10,
                       recurrence_window=(0.1, 0.6), **_NO_REF, **_ST),
    # MPGD (He et al. 2024, Alg. 1): gradient step on x0 only -- no backpropagation through the UNet.
    "mpgd": _preset(Guidance, name="mpgd", steps=50, x0_weight=0.1, x0_iters=1, recurrence=1, **_NO_REF, **_ST),
    # Universal Guidance (Bansal et al. 2023, Alg. 1): forward guidance scaled by sqrt(1 - a_t),
    # backward guidance (a few steps on x0), self-recurrence K = 4; in TFG's unified form.
    "ugd": _preset(Guidance, name="ugd", steps=50, weight=4.0, norm="eps", clamp_k=None, schedule="sigma",
                   x0_weight=0.05, x0_iters=3, recurrence=4, early_steps=0, **_ST),
    # TFG (Ye et al. 2024, Alg. 1): rho (z_t gradient), mu (x0 gradient, N_iter = 4), sigma (MC
    # smoothing), N_recur = 2, "increase" schedule.
    "tfg": _preset(Guidance, name="tfg", steps=50, z_weight=0.02, norm="unit", x0_weight=0.05, x0_iters=4,
                   sigma=0.1, mc_samples=1, schedule="alpha", recurrence=2, **_NO_REF, **_ST),
    # Optimisation / activation-maximisation baselines (featinv.baselines).
    "pixel": _preset(PixelInversion, name="pixel"),
    "fourier": _preset(FourierVisualization, name="fourier"),
    "deepinversion": _preset(DeepInversion, name="deepinversion"),
}


def register_method(name: str, factory: Callable[..., Any]) -> None:
    """Add a method: ``factory(**overrides)`` returns an object following ``featinv.contract.Method``."""
    PRESETS[name] = factory


def list_methods() -> list[str]:
    return sorted(PRESETS)


def get_method(name: str, /, **overrides):
    """A preset by name, with fields overridden (e.g. ``get_method("fast", weight=2.0)``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown method {name!r}; known: {sorted(PRESETS)}.{suggest(name, PRESETS)}")
    probe = PRESETS[name]()
    if dataclasses.is_dataclass(probe):
        fields = {f.name for f in dataclasses.fields(probe)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"method {name!r} has no option(s) {unknown}; options: {sorted(fields)}."
                            f"{suggest(unknown[0], fields)}")
    return PRESETS[name](**overrides) if overrides else probe


def make_method(spec: str | dict | Any):
    """``"fast"``, ``{"preset": "fast", "name": "fast-w2", "weight": 2.0}`` or a method object -> a method."""
    if isinstance(spec, str):
        return get_method(spec)
    if not isinstance(spec, dict):
        return spec
    spec = dict(spec)
    preset = spec.pop("preset", None) or spec.pop("method", None)
    if preset is None:
        raise ValueError(f"method {spec} needs a 'preset' naming a method ({', '.join(list_methods())})")
    if "name" not in spec:
        spec["name"] = preset
    return get_method(preset, **spec)


def method_config(method) -> dict:
    """Every field that determines a method's output (for fingerprints and saved configs)."""
    if dataclasses.is_dataclass(method):
        return {"class": type(method).__name__, **{f.name: _plain(getattr(method, f.name))
                                                   for f in dataclasses.fields(method)}}
    return {"class": type(method).__qualname__, "repr": repr(method)}


def _plain(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v):
        return {"class": type(v).__name__, **{f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if hasattr(v, "tolist"):
        return v.tolist()
    return repr(v)
