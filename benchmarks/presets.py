"""Paper preset versus fast presets on the embedded digits world: cosine reached against NFE.

    python benchmarks/presets.py [--n 32]

Same prior, encoder (digits CNN penultimate), targets and seeds for every run. Reports final and
best cosine, NFE per image, seconds per image, and the smallest NFE at which a fast variant's mean
final cosine comes within 0.01 of the paper preset's. Writes benchmarks/results/presets.{md,json}
and a cosine-vs-NFE figure benchmarks/results/presets.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import commit  # noqa: E402

import featinv  # noqa: E402
from featinv.data import DigitsTargets  # noqa: E402

# (steps, recurrence, early_steps, early_recurrence); the first entries of each line are cheap
VARIANTS = [(10, 1, 0, 1), (10, 4, 0, 1), (25, 1, 0, 1), (25, 4, 0, 1), (50, 1, 0, 1), (50, 2, 0, 1),
            (50, 4, 3, 20), (100, 2, 0, 1), (100, 4, 3, 20), (200, 4, 5, 50)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/presets")
    ap.add_argument("--skip-paper", action="store_true", help="only the fast variants")
    a = ap.parse_args()
    torch.set_num_threads(2)
    prior = featinv.build_prior("zoo:digits-ddpm")
    enc = featinv.build_encoder("zoo:digits-cnn@penultimate")
    targets = DigitsTargets("test", limit=a.n)
    keys = [(targets.name, i) for i in range(a.n)]
    runs = [("shirahama2025", {})] if not a.skip_paper else []
    runs += [(f"fast-s{s}-K{k}-e{e}x{ek}", dict(steps=s, recurrence=k, early_steps=e, early_recurrence=ek))
             for s, k, e, ek in VARIANTS]
    rows = []
    for name, kw in runs:
        method = featinv.get_method("shirahama2025" if name == "shirahama2025" else "fast", **kw)
        t0 = time.perf_counter()
        r = featinv.invert(targets.images, prior=prior, encoder=enc, method=method, keys=keys, seed=0)
        rows.append(dict(name=name, nfe=int(r.nfe[0]), final_cos=float(r.final_cos.mean()),
                         best_cos=float(r.best_cos.mean()), s_per_image=(time.perf_counter() - t0) / a.n))
        print(json.dumps(rows[-1]), flush=True)
    paper = next((r for r in rows if r["name"] == "shirahama2025"), None)
    match = None
    if paper:
        ok = [r for r in rows if r["name"] != "shirahama2025" and r["final_cos"] >= paper["final_cos"] - 0.01]
        match = min(ok, key=lambda r: r["nfe"]) if ok else None
    meta = dict(n=a.n, machine=f"{platform.machine()}, {os.cpu_count()} CPU cores", torch=torch.__version__,
                commit=commit(),
                command=f"python benchmarks/presets.py --n {a.n}")
    json.dump({"meta": meta, "rows": rows, "match": match}, open(a.out + ".json", "w"), indent=1)
    lines = [f"# Paper preset vs fast presets (digits world, {a.n} held-out targets, seed 0)\n",
             f"Machine: {meta['machine']}; torch {meta['torch']}; commit {meta['commit']}. "
             f"Command: `{meta['command']}`.\n", "| run | NFE | final cos | best cos | s/image |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['nfe']} | {r['final_cos']:.4f} | {r['best_cos']:.4f} | {r['s_per_image']:.3f} |"
              for r in rows]
    if paper:
        lines.append("\nSmallest NFE within 0.01 of the paper preset's final cosine "
                     f"({paper['final_cos']:.4f}): " + (f"**{match['name']}, NFE {match['nfe']}** "
                     f"({paper['nfe'] / match['nfe']:.0f}x fewer)" if match else "none of the variants"))
    open(a.out + ".md", "w").write("\n".join(lines) + "\n")
    _plot(rows, a.out + ".png")
    print("\n".join(lines))


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for r in rows:
        paper = r["name"] == "shirahama2025"
        ax.scatter(r["nfe"], r["final_cos"], marker="*" if paper else "o", s=120 if paper else 30,
                   color="C3" if paper else "C0")
        ax.annotate(r["name"].replace("fast-", ""), (r["nfe"], r["final_cos"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("NFE per image (prior evaluations)")
    ax.set_ylabel("mean final cosine to target")
    ax.set_title("Guided inversion on digits: cosine vs NFE", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


if __name__ == "__main__":
    main()
