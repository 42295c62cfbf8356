"""Cost of guidance on the embedded digits world (CPU): guided vs unguided per-step time in one run.

    python benchmarks/cost.py [--batches 1,4,16]

For the through-UNet guidance (``fast``: gradient w.r.t. z_t) and the x0 shortcut (``mpgd``: no
backward through the UNet): median seconds per evaluation guided and unguided at each batch size,
their ratio, images per second for the full preset (batch / (NFE x s/eval)), and process peak RSS.
Writes benchmarks/results/cost.md. The GPU counterpart with full-size SD is gpu_cost.py.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import commit  # noqa: E402
from gpu_cost import time_evals  # noqa: E402

import featinv  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/cost.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prior = featinv.build_prior("zoo:digits-ddpm")
    enc = featinv.build_encoder("zoo:digits-cnn@penultimate")
    rows = []
    for preset in ("fast", "mpgd"):
        nfe = featinv.get_method(preset).nfe()
        for b in map(int, a.batches.split(",")):
            g, _ = time_evals(prior, enc, b, True, "cpu", preset=preset)
            u, _ = time_evals(prior, enc, b, False, "cpu", preset=preset)
            rows.append((preset, b, g, u, g / u, b / (nfe * g), nfe))
            print(rows[-1], flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    sha = commit()
    lines = ["# Cost of guidance, digits world (16x16 DDPM prior, digits CNN), CPU\n",
             f"{os.cpu_count()} CPU cores, {a.threads} torch threads; torch {torch.__version__}; commit {sha}. "
             f"Command: `python benchmarks/cost.py --batches {a.batches}`. Median of 10 evaluations after 3 "
             f"warm-ups, guided and unguided in the same run; process peak RSS {rss:.0f} MiB.\n",
             "| method | batch | s/eval guided | s/eval unguided | guided/unguided | images/s (full preset) | NFE |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {p} ({'z_t gradient through the UNet' if p == 'fast' else 'x0 gradient, no UNet backward'}) | {b} | "
              f"{g:.4f} | {u:.4f} | {r:.2f} | {ips:.2f} | {nfe} |" for p, b, g, u, r, ips, nfe in rows]
    open(a.out, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
