"""Which planted biases does a shapes target classifier actually use? The probes behind ``targets.BIASED``.

    python benchmarks/planted_bias_probes.py [--seeds 0 1] [--threads 2]

For each design (label factor <- bias factor, label -> bias mapping, training alignment) a ``ShapesCNN``
is trained exactly like ``featinv.zoo.shapes.targets.train_targets`` (20,000 train renders with the bias
planted by ``targets.biased_rows``, 500 steps, batch 128, lr 3e-3, width 16), then read on 2,000 *val*
renders whose factors are independent: ``targets.bias_use`` (accuracy on bias-aligned and
bias-conflicting rows, their gap, ``follows_bias``). A planted bias counts as ground truth only if the gap
is >= ``targets.MIN_BIAS_GAP``. Writes ``benchmarks/results/planted_bias_probes.{md,csv}``.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import commit  # noqa: E402

from featinv.zoo.shapes import fit  # noqa: E402
from featinv.zoo.shapes import targets as T  # noqa: E402
from featinv.zoo.shapes import world as W  # noqa: E402

DESIGNS = [  # label <- bias, mapping (label value -> bias value index), alignments tried
    ("color", "background", [0, 1, 2, 3, 0, 1], [0.95]),
    ("background", "color", [0, 2, 4, 5], [0.95, 1.0]),
    ("size", "color", [0, 2, 4], [0.95, 0.99, 1.0]),
    ("size", "background", [0, 1, 2], [0.95, 0.99, 1.0]),
    ("shape", "size", [0, 1, 2, 0], [0.95]),
    ("shape", "background", [0, 1, 2, 3], [0.95]),
    ("shape", "color", [0, 1, 2, 3], [0.95]),
    ("shape", "position", [0, 2, 6, 8], [0.95]),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/planted_bias_probes")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    x0, rows0 = W.load_split("single", "train", 20000)
    xv, rv = W.load_split("single", "val", 2000)
    out = []
    for label, bias, mapping, alignments in DESIGNS:
        for p in alignments:
            b = T.Bias(label, bias, mapping, p)
            for seed in a.seeds:
                rows = T.biased_rows(rows0, b, np.random.default_rng(1234 + seed))
                torch.manual_seed(seed)
                model = T.ShapesCNN({"label": len(W.FACTORS[label])}, width=16, feature_dim=32, global_pool=False)
                fit.fit("probe", model, W.render(rows), {"label": torch.from_numpy(rows[label].astype(np.int64))},
                        steps=500, batch=128, lr=3e-3, seed=seed, log_every=10_000)
                use = T.bias_use(b, fit.predict(model, xv)["label"].argmax(1).numpy(), rv)
                row = dict(label=label, bias=bias, mapping=" ".join(map(str, mapping)), alignment=p, seed=seed, **use,
                           used=use["gap"] >= T.MIN_BIAS_GAP)
                out.append(row)
                print(row, flush=True)
    cols = list(out[0])
    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(out)
    lines = ["# Planted-bias probes: does a shapes target classifier use the bias planted in its training data?", "",
             f"Commit `{commit()}`; command `python benchmarks/planted_bias_probes.py {' '.join(sys.argv[1:])}`; "
             f"seeds {a.seeds} (model init, data order, bias draw 1234 + seed); machine: {platform.machine()}, "
             f"{os.cpu_count()} CPU cores, torch threads {a.threads}; torch {torch.__version__}; "
             f"wall {(time.time() - t0) / 60:.1f} min.", "",
             "Each row: a `ShapesCNN` trained like `targets.train_targets` on 20,000 train renders with the bias "
             "planted, read on 2,000 val renders with independent factors (`targets.bias_use`). Used = gap "
             f">= {T.MIN_BIAS_GAP} (the rule `train_targets` enforces).", "",
             "| label <- bias | alignment | seed | acc. aligned | acc. conflicting | gap | follows bias | used |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out:
        fb = "-" if r["follows_bias"] is None else f"{r['follows_bias']:.2f}"
        lines.append(f"| {r['label']} <- {r['bias']} | {r['alignment']} | {r['seed']} | {r['accuracy_bias_aligned']:.2f} | "
                     f"{r['accuracy_bias_conflicting']:.2f} | {r['gap']:.2f} | {fb} | {'yes' if r['used'] else 'no'} |")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
