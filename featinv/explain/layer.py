"""A network split at a conv layer: EDDP's f- (image -> spatial activations) and f+ (activations -> classes).

EDDP (Doumanoglou et al., arXiv 2509.23926) treats every spatial position of a conv layer as a sample
x_p in R^D (D = channels) and needs the rest of the network, f+, to run from *edited* activations: the
uncertainty-region losses L^uur / L^cur evaluate f+(X'), RCAV perturbs X along a signal vector and a
counterfactual moves one image's activations along a direction. ``LayerSplit`` gives both halves for a
``featinv.encoders.Encoder`` at a named layer:

* ``activations(images) -> X`` (N, P, D), P = H*W positions in row-major order (``Encoder.activation``);
* ``f_plus(X)`` (N, P, D) -> class probabilities (N, K): the layer's downstream graph, cut out of the
  model with ``torch.fx`` so that f+ never re-runs f- (a permutation test calls it thousands of times).
  A multi-head classifier (``model.heads`` = {head: n_classes}, logits concatenated) gets a softmax per
  head, concatenated: sum_k p log p over the output is then the sum of the heads' negative entropies
  (EDDP's L^uur with ``output="probs"``) and every class is a (head, value) pair (``classes``).
``run_from`` (the Encoder's hook) is the reference f+; ``check`` compares the two on given images.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx
from torch import Tensor, nn


def to_positions(act: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H*W, C): one row per position (EDDP's x_p)."""
    return act.flatten(2).transpose(1, 2)


def to_map(X: Tensor, hw: tuple[int, int]) -> Tensor:
    """(N, H*W, C) -> (N, C, H, W), the inverse of ``to_positions``."""
    return X.transpose(1, 2).reshape(X.shape[0], X.shape[2], *hw)


def downstream(model: nn.Module, layer: str) -> nn.Module:
    """The part of ``model`` after the module ``layer`` as a ``GraphModule`` taking that module's output.

    Built by ``torch.fx`` symbolic tracing: the nodes that depend only on the layer's output (and on
    parameters) are copied into a new graph whose input is that output. Raises ``ValueError`` when the
    model cannot be traced, when the layer runs more than once per forward, or when a later node also
    reads something computed before the layer (a skip connection around it): then f+ is not a function
    of the layer's output alone."""
    class _Tracer(torch.fx.Tracer):  # the layer stays one call even when it is a container (Sequential)
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname == layer or super().is_leaf_module(m, qualname)

    try:
        tracer = _Tracer()
        gm = torch.fx.GraphModule(tracer.root if hasattr(tracer, "root") else model, tracer.trace(model))
    except Exception as e:  # noqa: BLE001 - any tracing failure means: no cut-out f+
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e})") from None
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer]
    if len(nodes) != 1:
        raise ValueError(f"layer {layer!r} is called {len(nodes)} times in the traced graph (need exactly 1)")
    cut = nodes[0]
    graph = torch.fx.Graph()
    env = {cut: graph.placeholder("activation")}
    after = False
    for n in gm.graph.nodes:
        if n is cut:
            after = True
            continue
        if n.op == "get_attr":
            env[n] = graph.node_copy(n, lambda a: env[a])
            continue
        if not after or n.op == "placeholder":
            continue
        missing = [a for a in n.all_input_nodes if a not in env]
        if missing:
            raise ValueError(f"node {n.name!r} after {layer!r} reads {missing[0].name!r}, computed before it: "
                             "f+ is not a function of the layer's output alone")
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.lint()
    return torch.fx.GraphModule(gm, graph)


class LayerSplit:
    """f- and f+ of an ``Encoder`` at its layer (see the module docstring).

    ``heads``: {head: n_classes} of a multi-head classifier (default ``encoder.model.heads`` if the model
    has it, else one head over the whole output); ``class_names``: {head: [value names]} for ``classes``.
    ``f_plus``: give f+ explicitly ((N, C, H, W) map -> logits) for a model ``downstream`` cannot cut."""

    def __init__(self, encoder, heads: Optional[dict[str, int]] = None,
                 class_names: Optional[dict[str, list[str]]] = None, f_plus: Optional[nn.Module] = None):
        if encoder.layer is None:
            raise ValueError("LayerSplit needs an encoder at a named layer")
        self.encoder = encoder
        self.layer = encoder.layer
        self._down = f_plus if f_plus is not None else downstream(encoder.model, encoder.layer)
        self._heads = heads if heads is not None else getattr(encoder.model, "heads", None)
        self.class_names = class_names
        self.hw: Optional[tuple[int, int]] = None

    @torch.no_grad()
    def activations(self, images: Tensor, batch: int = 256) -> Tensor:
        """X (N, P, D) at the layer for images (N, C, H, W) in [0, 1]; remembers the map size ``hw``."""
        outs = []
        for i in range(0, len(images), batch):
            a = self.encoder.activation(images[i:i + batch]).float()
            if a.ndim != 4:
                raise ValueError(f"layer {self.layer!r} gives {tuple(a.shape)}; EDDP needs a conv map (N, C, H, W)")
            self.hw = tuple(a.shape[-2:])
            outs.append(to_positions(a))
        return torch.cat(outs)

    @property
    def heads(self) -> dict[str, int]:
        if self._heads is None:
            raise RuntimeError("heads unknown until f_plus has run once (or pass heads=)")
        return dict(self._heads)

    def logits(self, X: Tensor) -> Tensor:
        """f+ logits (N, K) from activations (N, P, D)."""
        if self.hw is None:
            raise RuntimeError("call activations() first (the map size is taken from it)")
        out = self._down(to_map(X, self.hw))
        if self._heads is None:
            self._heads = {"class": out.shape[-1]}
        return out

    def f_plus(self, X: Tensor) -> Tensor:
        """Per-head softmax probabilities (N, K), concatenated in ``heads`` order."""
        logits = self.logits(X)
        return torch.cat([p.softmax(-1) for p in logits.split(list(self.heads.values()), dim=-1)], -1)

    __call__ = f_plus

    def classes(self) -> list[tuple[str, str]]:
        """(head, value name) for every output column of ``f_plus``."""
        out = []
        for h, k in self.heads.items():
            names = (self.class_names or {}).get(h) or [str(j) for j in range(k)]
            out += [(h, names[j]) for j in range(k)]
        return out

    def head_slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for h, k in self.heads.items():
            out[h] = slice(start, start + k)
            start += k
        return out

    @torch.no_grad()
    def check(self, images: Tensor, atol: float = 1e-4) -> float:
        """Max |f+(f-(x)) - model(x)| over ``images`` (logits); raises if above ``atol``: the cut-out graph
        must be the network the encoder runs (``Encoder.run_from`` with the identity edit)."""
        X = self.activations(images)
        ref = self.encoder.run_from(images, lambda o: o).float()
        err = float((self.logits(X) - ref).abs().max())
        if err > atol:
            raise AssertionError(f"f+ differs from the model by {err:.3g} > {atol}")
        return err
