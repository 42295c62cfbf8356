"""Are a shapes classifier's EDDP directions shape-selective? (a diagnostic for benchmarks/eddp.py --part shapes)

    python benchmarks/eddp_shapes_probe.py --classifier zoo:shapes-shape --directions 16

EDDP is fitted as the shapes benchmark fits it (300 unlabelled train renders, ``fast`` with 600/300/600 epochs,
one start, seed 0, at ``conv3``); on 300 val renders, per direction: the Network Dissection IoU with any:object and
with each shape concept, and the share of each shape's object pixels on which the direction detects
(W^T x - b > 0, upsampled bilinearly to 32x32). An object detector fires on every shape alike; a shape detector
on one. Prints a table; writes nothing.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from eddp_shapes import eddp_config  # noqa: E402

from featinv.explain import eddp_shapes as ES  # noqa: E402
from featinv.explain.baselines import from_pairs  # noqa: E402
from featinv.explain.concepts import dissect, upsample  # noqa: E402
from featinv.explain.eddp_world import LayerConfig, fit_directions  # noqa: E402
from featinv.explain.layer import to_map  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--classifier", default="zoo:shapes-shape")
    ap.add_argument("--directions", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cs = ES.concepts()
    train, val = ES.world_data("train", 300, cs), ES.world_data("val", 300, cs)
    split = ES.layer_split(a.classifier, "conv3")
    fit_X, X_val = split.activations(train.images), split.activations(val.images)
    cfg = eddp_config(argparse.Namespace(epochs=600))  # the shapes benchmark's schedule
    pairs = fit_directions(split, fit_X, LayerConfig(n_directions=a.directions, eddp=cfg), seed=0)
    maps = to_map(from_pairs(pairs).score(X_val), split.hw)
    iou = dissect(maps, torch.zeros(a.directions), val.masks)
    names = cs.names
    shapes = [i for i, (f, _) in enumerate(names) if f == "shape"]
    any_obj = names.index(("any", "object"))
    det = upsample(maps, (32, 32)) > 0
    head = " / ".join(names[i][1] for i in shapes)
    print(f"| dir | IoU any:object | IoU {head} | detection rate on object pixels: {head} |")
    print("|---|---|---|---|")
    for d in range(a.directions):
        rates = [float(det[:, d][val.masks[:, i].bool()].float().mean()) for i in shapes]
        print(f"| {d} | {iou[d, any_obj]:.3f} | " + " / ".join(f"{iou[d, i]:.3f}" for i in shapes) + " | "
              + " / ".join(f"{r:.2f}" for r in rates) + " |")


if __name__ == "__main__":
    main()
