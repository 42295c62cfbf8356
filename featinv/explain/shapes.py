"""DEXTER's language side in the shapes world: the template grammar, the masked LM's corpus, the
target classifiers' truth, and the training command of the masked LM.

The language here is a *template grammar*, not language: the shapes prior was trained on captions
"a {size} {color} {shape} at the {row col} on a {background} background" (``featinv.zoo.shapes.world``),
so DEXTER's template is that caption with its six content words masked -
"a [MASK] [MASK] [MASK] at the [MASK] [MASK] on a [MASK] background" (DEXTER's own template has six
masks too) - and its masked LM (``featinv.explain.mlm``) is trained on the grammar's 2,592 captions.
The canonical form writes the centre cell "middle center" and the dark-blue background "blue"
(one word per slot); ``TEMPLATE.rewrites`` give the prior the surface form it was trained on.

Train the masked LM (seeded; about a minute on 2 CPU cores)::

    python -m featinv.explain.shapes train-mlm [--steps 1500 --seed 0]
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from featinv.explain.prompt import Template

__all__ = ["TEMPLATE", "MLM_PATH", "canonical_corpus", "class_words", "classifier_info",
           "load_shapes_mlm", "slot_variants", "value_words"]

SLOT_FACTORS = ["size", "color", "shape", "position", "position", "background"]
MLM_PATH = Path(__file__).resolve().parent / "weights" / "shapes-mlm"


def _world():
    from featinv.zoo.shapes import world

    return world


def _slot_vocab() -> list[list[str]]:
    """Each slot's words: its factor's values as slot words (position: rows, then columns)."""
    factors, out = _world().FACTORS, []
    for i, f in enumerate(SLOT_FACTORS):
        k = SLOT_FACTORS[:i].count(f)  # which of the factor's slots
        out.append(list(dict.fromkeys(value_words(f, v)[k] for v in factors[f])))
    return out


def value_words(factor: str, value: str) -> list[str]:
    """The canonical slot words of a factor value: "top left" -> [top, left], "center" -> [middle, center],
    "dark blue" (background) -> [blue]."""
    if factor == "position":
        return ["middle", "center"] if value == "center" else value.split()
    if factor == "background" and value == "dark blue":
        return ["blue"]
    return [value]


TEMPLATE = Template("a {} {} {} at the {} {} on a {} background",
                    rewrites=[("at the middle center", "in the center"),
                              ("on a blue background", "on a dark blue background")],
                    slot_vocab=_slot_vocab())


def slot_variants(words: list[str], class_factor: str | None = None) -> dict[str, list[list[str]]]:
    """For every captioned factor but ``class_factor``: the canonical ``words`` with that factor's slots set
    to each of its values in turn (the counterfactual report's sweep, ``reporter.sweep_report``)."""
    world = _world()
    if len(words) != len(SLOT_FACTORS):
        raise ValueError(f"expected {len(SLOT_FACTORS)} slot words, got {words}")
    out = {}
    for factor, values in world.FACTORS.items():
        if factor == class_factor:
            continue
        slots = [i for i, f in enumerate(SLOT_FACTORS) if f == factor]
        out[factor] = []
        for v in values:
            w = list(words)
            vw = value_words(factor, v)
            if len(vw) != len(slots):
                raise ValueError(f"{factor}={v!r} gives words {vw} for {len(slots)} slots")
            for i, x in zip(slots, vw):
                w[i] = x
            out[factor].append(w)
    return out


def canonical_corpus() -> list[str]:
    """Every full single-object caption of the grammar (2,592), in canonical template form."""
    from featinv.zoo.shapes import text

    world = _world()
    return [TEMPLATE.canonical(c) for c in world.captions(text.all_single_rows())]


def class_words(factor: str, value: str) -> list[str]:
    """Words that must appear (in order, adjacent) in a prompt that names class ``value`` of ``factor``."""
    return value_words(factor, value)


def classifier_info(name: str) -> dict:
    """Truth of a shapes target classifier (``featinv.zoo.shapes.targets``): label factor, class names,
    planted bias factor (None if unbiased) and the label -> bias value mapping."""
    from featinv.zoo.shapes import targets

    world = _world()
    if name.startswith("zoo:"):
        name = name[4:]
    name = name.removeprefix("shapes-target-").split("?")[0].split("@")[0]
    if name in targets.BIASED:
        label, bias, mapping, _ = targets.BIASED[name]
        return dict(name=name, label_factor=label, classes=list(world.FACTORS[label]), bias_factor=bias,
                    bias_values=[world.FACTORS[bias][m] for m in mapping])
    if name in targets.UNBIASED:
        label = targets.UNBIASED[name]
        return dict(name=name, label_factor=label, classes=list(world.FACTORS[label]), bias_factor=None,
                    bias_values=None)
    raise KeyError(f"{name!r} is not a single-object shapes target classifier "
                   f"({sorted(targets.BIASED) + sorted(targets.UNBIASED)})")


def load_shapes_mlm(path: str | Path | None = None):
    """The masked LM trained on the shapes grammar (``WordMLM``, frozen) and its metadata."""
    from featinv.explain.mlm import load_mlm

    path = Path(path) if path is not None else MLM_PATH
    if not path.with_suffix(".safetensors").exists():
        raise FileNotFoundError(f"{path}.safetensors not found; run `python -m featinv.explain.shapes train-mlm`")
    return load_mlm(path)


def _train(argv: list[str]) -> None:
    from featinv.explain.mlm import save_mlm, train_mlm

    ap = argparse.ArgumentParser(prog="python -m featinv.explain.shapes train-mlm")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(MLM_PATH))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    corpus = canonical_corpus()
    model, info = train_mlm(corpus, TEMPLATE, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed)
    import transformers

    meta = dict(template=TEMPLATE.text, rewrites=TEMPLATE.rewrites, slot_factors=SLOT_FACTORS,
                corpus="featinv.explain.shapes.canonical_corpus(): all 2,592 single-object captions, canonical form",
                training=info, command="python -m featinv.explain.shapes train-mlm " + " ".join(argv),
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                machine=f"{platform.machine()} CPU, torch threads={a.threads}")
    save_mlm(model, a.out, meta)
    print(f"[mlm] saved {a.out}.safetensors / .json: {info}")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "train-mlm":
        sys.exit("usage: python -m featinv.explain.shapes train-mlm [--steps N --seed S]")
    _train(sys.argv[2:])
