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
