"""String specs for models: ``family:name[/weights][@layer][?key=value&...]`` -> a prior or an encoder.

One grammar for every family (``zoo``, ``pixel``, ``latent``, ``timm``, ``torchvision``, ``clip``):

* ``family``: which builder; ``name`` (with an optional ``/weights`` part that the family reads);
* ``@layer``: the module whose output is the feature (encoders);
* ``?key=value&...``: keyword options, typed (``true``/``false``/``none``/numbers), merged with
  Python keywords (keywords win) and checked against the builder's signature.

Builders are registered with ``@register_prior(family)`` / ``@register_encoder(family)``; the
built-in families live in the modules named in ``BUILTIN_FAMILIES`` and are imported by name only
when a spec asks for them, so the core never imports a world (``featinv.zoo``) or a model library
it does not use. A new family is one function with the decorator, in any module the user imports.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Spec", "parse_spec", "Registry", "PRIORS", "ENCODERS", "register_prior", "register_encoder",
           "build_prior", "build_encoder", "suggest", "BUILTIN_FAMILIES"]

# kind -> family -> module that registers it (imported lazily, by name).
BUILTIN_FAMILIES: dict[str, dict[str, str]] = {
    "prior": {"pixel": "featinv.priors", "latent": "featinv.priors", "zoo": "featinv.zoo"},
    "encoder": {"zoo": "featinv.zoo", "timm": "featinv.models", "torchvision": "featinv.models",
                "clip": "featinv.models"},
}


def suggest(name: str, known) -> str:
    """' Did you mean: 'x'?' for close matches of ``name`` among ``known`` (or '')."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""


def _value(s: str) -> Any:
    low = s.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null", ""):
        return None
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s.strip()


@dataclass(frozen=True)
class Spec:
    """A parsed spec. ``str(spec)`` gives it back in canonical form."""

    family: str
    name: str
    layer: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        s = f"{self.family}:{self.name}" + (f"@{self.layer}" if self.layer else "")
        opts = "&".join(f"{k}={v}" for k, v in self.options.items())
        return s + (f"?{opts}" if opts else "")


def parse_spec(spec: str, kind: str = "model") -> Spec:
    """``"timm:resnet50@layer3?pool=avg"`` -> Spec("timm", "resnet50", "layer3", {"pool": "avg"})."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{kind} spec {spec!r} must look like 'family:name[/weights][@layer][?key=value&...]'")
    family, rest = spec.split(":", 1)
    rest, _, query = rest.partition("?")
    name, _, layer = rest.partition("@")
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{kind} spec {spec!r}: option {item!r} must look like key=value")
        options[key.strip()] = _value(val)
    return Spec(family.strip(), name, layer or None, options)


class Registry:
    """Builders ``fn(name, layer=None, **options)`` by family; ``build("family:name@layer?opts")``."""

    def __init__(self, kind: str):
        self.kind, self.families = kind, {}

    def register(self, family: str) -> Callable:
        def deco(fn):
            self.families[family] = fn
            return fn

        return deco

    def builder(self, family: str) -> Callable:
        if family not in self.families and family in BUILTIN_FAMILIES.get(self.kind, {}):
            importlib.import_module(BUILTIN_FAMILIES[self.kind][family])
        if family not in self.families:
            known = sorted(set(self.families) | set(BUILTIN_FAMILIES.get(self.kind, {})))
            raise KeyError(f"unknown {self.kind} family {family!r}; known: {known}.{suggest(family, known)}")
        return self.families[family]

    def build(self, spec: str, **kw):
        s = parse_spec(spec, self.kind)
        fn = self.builder(s.family)
        options = {**s.options, **kw}
        _check_options(fn, options, f"{s.family}:{s.name}")
        return fn(s.name, s.layer, **options)


def _check_options(fn: Callable, options: dict, where: str) -> None:
    """Unknown options -> one TypeError naming the accepted ones (builders with **kw accept all)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or
                (p.kind is p.POSITIONAL_OR_KEYWORD and n not in ("name", "layer"))]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"{where}: unknown option(s) {unknown}; accepted: {sorted(accepted)}."
                        f"{suggest(unknown[0], accepted)}")


PRIORS = Registry("prior")
ENCODERS = Registry("encoder")
register_prior = PRIORS.register
register_encoder = ENCODERS.register


def build_prior(spec, **kw):
    """A prior from ``zoo:digits-ddpm``, ``pixel:<id|dir>``, ``latent:<id|dir>[?prompt=...]``.
    A ``torch.nn.Module`` (an already built prior) passes through unchanged."""
    if not isinstance(spec, str):
        return spec
    return PRIORS.build(spec, **kw)


def build_encoder(spec, **kw):
    """An encoder from ``family:name[/weights][@layer][?options]``, e.g. ``zoo:digits-cnn@penultimate``.
    An ``Encoder`` (any module) passes through unchanged."""
    if not isinstance(spec, str):
        return spec
    return ENCODERS.build(spec, **kw)
