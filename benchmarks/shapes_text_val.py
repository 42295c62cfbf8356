"""The mini-CLIP text experiment's guidance weight, chosen on validation prompts.

    HF_HUB_OFFLINE=1 python benchmarks/shapes_text_val.py [--seeds 0 1 2]

configs/shapes/text_clip.yaml inverts four test prompts ("a red circle", "a blue square", "a yellow triangle",
"a green star") with the weight chosen for image targets (w = 1, linear increase). Here the same experiment
(``shapes_validity.text_experiment``: retention of the named shape and colour, 8 inversions per prompt) runs on four
*validation* prompts of the same form whose (colour, shape) pairs are not among the test prompts, for weights
0.1-4; the weight with the highest mean retention of the named factors is the val choice. Writes
benchmarks/results/shapes_text_val.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

sys.path.insert(0, str(Path(__file__).parent))
from _common import commit, cpu_model  # noqa: E402
from shapes_validity import FACTORS, text_experiment  # noqa: E402

VAL_PROMPTS = ["a orange square", "a purple circle", "a red triangle", "a blue star"]  # the grammar's article is "a"
WEIGHTS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default="outputs/shapes_text_val")
    a = ap.parse_args()
    t0 = time.time()
    methods = [{"preset": "fast", "name": f"w{w:g}-inc", "weight": w, "schedule": "linear_increase"} for w in WEIGHTS]
    rows = text_experiment(Path(a.work), a.seeds, ["--model.methods", json.dumps([*methods, "unguided"]),
                                                   "--data.datasets.init_args.prompts", json.dumps(VAL_PROMPTS)])
    for r in rows:
        r["named_mean"] = (r["r_shape"] + r["r_color"]) / 2
    guided = [r for r in rows if r["method"] != "unguided"]
    chosen = max(guided, key=lambda r: r["named_mean"])["method"]
    wall = time.time() - t0
    cmd = "python benchmarks/shapes_text_val.py " + shlex.join(sys.argv[1:])
    lines = ["# Mini-CLIP text targets: the guidance weight on validation prompts\n",
             f"Commit `{commit()}`, `{cmd.strip()}`, seeds {a.seeds}, {cpu_model()} ({platform.machine()}, "
             f"{os.cpu_count()} CPU cores), wall {wall / 60:.1f} min. Prompts (val): {', '.join(VAL_PROMPTS)}; 8 "
             "inversions each per seed, `zoo:shapes-clip?normalize=true`, prior `zoo:shapes-sd` (empty prompt), "
             "reader `zoo:shapes-reader`. r = retention of the named value (shape, colour) or, for the factors the "
             "prompt does not name, agreement between inversions of one prompt against chance (low = they vary).\n",
             f"**Chosen on val: `{chosen}`** (highest mean of the named shape and colour retention).\n",
             "| method | n | final cos | named mean | " + " | ".join(f"{k}: r" for k in FACTORS) + " |",
             "|---|---|---|---|" + "---|" * len(FACTORS)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['n']} | {r['final_cos']:.3f} | {r['named_mean']:.2f} | "
                     + " | ".join(f"{r[f'r_{k}']:.2f}" for k in FACTORS) + " |")
    res = Path(__file__).parent / "results"
    (res / "shapes_text_val.md").write_text("\n".join(lines) + "\n")
    (res / "shapes_text_val.json").write_text(json.dumps(dict(commit=commit(), command=cmd, chosen=chosen, rows=rows,
                                                              wall_seconds=round(wall, 1)), indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
