"""EDDP in the shapes world: the renderer's masks and factors as concepts, the classifiers as splits.

The glue between the world-agnostic EDDP pipeline (``featinv.explain.eddp_world``) and the shapes world
(``featinv.zoo.shapes``): the only EDDP file that names the world. Concepts are every captioned factor's
values - shape (4), colour (6), size (3) and position (9) on the object's pixels, background (4) on the
background's pixels - plus any/object and any/background (``concepts.ConceptSet``): 28 in all.
Renders come from the world's fixed, disjoint splits (``world.load_split``): fit on ``train``, choose
hyper-parameters on ``val``, report on ``test``.
"""
from __future__ import annotations

from featinv.explain.concepts import ConceptSet
from featinv.explain.eddp_world import WorldData
from featinv.explain.layer import LayerSplit
from featinv.specs import build_encoder

DEFAULT_LAYER = "conv3"


def factors() -> dict[str, list[str]]:
    from featinv.zoo.shapes.world import FACTORS

    return {k: list(v) for k, v in FACTORS.items()}


def concepts() -> ConceptSet:
    return ConceptSet(factors(), background_factors=("background",), generic=True)


def world_data(split: str, n: int, concept_set: ConceptSet | None = None) -> WorldData:
    """The first ``n`` single-object renders of ``split`` with their concept masks and factor labels."""
    from featinv.zoo.shapes import world

    images, rows = world.load_split("single", split, n)
    labels = world.labels(rows)
    masks = (concept_set or concepts()).masks(world.masks(rows)["object"], labels)
    return WorldData(images, masks, labels)


def layer_split(classifier: str, layer: str = DEFAULT_LAYER) -> LayerSplit:
    """``LayerSplit`` of a shapes classifier spec (``zoo:shapes-shape``; ``?path=`` for other weights) at
    ``layer``; its heads' classes are named by the world's factor values."""
    base, _, query = classifier.partition("?")
    base = base.split("@")[0]
    enc = build_encoder(f"{base}@{layer}" + (f"?{query}" if query else ""))
    names = {h: vals for h, vals in factors().items() if h in getattr(enc.model, "heads", {})}
    return LayerSplit(enc, class_names=names)


def explain_classifier(classifier: str = "zoo:shapes-shape", n_directions: int = 16, *, layer: str = DEFAULT_LAYER,
                       n_fit: int = 300, eval_split: str = "test", n_eval: int = 500, config=None, seed: int = 0,
                       **layer_config):
    """The Python API: EDDP on a shapes classifier, labelled and tested on renders.

    >>> rep = explain_classifier("zoo:shapes-shape", 16)
    >>> rep.labels.names, rep.summary(), rep.rows()

    ``config``: an ``EDDPConfig`` or preset name (default ``fast``); ``layer_config``: further
    ``eddp_world.LayerConfig`` fields (cf_k, shared_null, influence_images, ...). Returns a ``LayerReport``
    (its ``pairs`` hold W, b, S)."""
    from featinv.explain.eddp_world import LayerConfig, explain_layer

    split = layer_split(classifier, layer)
    cs = concepts()
    cfg = LayerConfig(n_directions=n_directions, eddp=config or "fast", **layer_config)
    return explain_layer(split, world_data("train", n_fit, cs), world_data(eval_split, n_eval, cs), cs, cfg, seed=seed)


def validate(report, classifier: str = "zoo:shapes-shape", method="fast", *, layer: str = DEFAULT_LAYER,
             prior: str = "zoo:shapes-sd", reader: str = "zoo:shapes-reader", directions=None, n_samples: int = 4,
             seed: int = 0, **overrides):
    """AM validation of a report's directions with ``method`` (a preset name + ``overrides``, or a method):
    returns (``am.AMImages``, ``am.Readout``); ``am.rate(readout.hit)`` is the share of images showing the label."""
    from featinv.explain import am
    from featinv.methods import get_method
    from featinv.specs import build_prior

    m = get_method(method, **overrides) if isinstance(method, str) else method
    split = layer_split(classifier, layer)
    dirs = list(range(report.S.shape[1])) if directions is None else list(directions)
    res = am.maximise(m, build_prior(prior), split.encoder, report.S, dirs, n_samples, seed=seed,
                      dataset=classifier.split(":", 1)[-1].split("?")[0])
    return res, am.read(build_encoder(reader), res.images, [report.labels.names[i] for i in dirs], factors())
