"""String specs ``family:name[@layer]`` -> objects, with close-match suggestions on typos."""
from __future__ import annotations

import difflib
from collections.abc import Callable


def suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""


class Registry:
    """Families of builders ``fn(name, layer, **kw)``; ``build("family:name@layer")``."""

    def __init__(self, kind: str, loaders: Callable[[], None] | None = None):
        self.kind, self.families, self._loaders = kind, {}, loaders

    def register(self, family: str):
        def deco(fn):
            self.families[family] = fn
            return fn

        return deco

    def parse(self, spec: str) -> tuple[str, str, str | None]:
        if not isinstance(spec, str) or ":" not in spec:
            raise ValueError(f"{self.kind} spec {spec!r} must look like 'family:name[@layer]'; "
                             f"families: {sorted(self.families)}")
        family, rest = spec.split(":", 1)
        name, _, layer = rest.partition("@")
        return family, name, (layer or None)

    def build(self, spec: str, **kw):
        if self._loaders is not None:
            self._loaders()
        family, name, layer = self.parse(spec)
        if family not in self.families:
            raise KeyError(f"unknown {self.kind} family {family!r} in {spec!r}; known: "
                           f"{sorted(self.families)}.{suggest(family, self.families)}")
        return self.families[family](name, layer, **kw)


def load_builtin_families() -> None:
    """Import the modules that register the built-in families (zoo, and real models if present)."""
    import featinv.zoo  # noqa: F401
    try:
        import featinv.models  # noqa: F401
    except ModuleNotFoundError as e:  # the real-model zoo is optional
        if e.name != "featinv.models":
            raise
