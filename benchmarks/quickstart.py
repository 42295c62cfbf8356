"""The README's main job, measured: wall time (median of runs) and inversion quality.

    python benchmarks/quickstart.py [--runs 3] [--threads N]

Runs ``featinv predict -c configs/quickstart.yaml`` ``--runs`` times (after install), then scores
the last run's saved PNGs (what a user gets): mean final cosine to the target feature, and the
fraction whose label is read correctly by the guiding CNN and by the held-out ViT (never used for
guidance). Issue-16 target: wall <= 30 s on 2 cores with every inversion read as its target digit
by the held-out ViT. The load average before and after each run is recorded (the timing means
something only on quiet cores: load < ~1.2 on 2 cores). ``--threads`` sets OMP_NUM_THREADS for
the command (default: unset, torch's own default, as a user runs it).
Writes benchmarks/results/quickstart.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import commit  # noqa: E402
from PIL import Image  # noqa: E402

import featinv  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/quickstart.md")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    out = Path("outputs/bench_quickstart")
    env = {**os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})}
    walls, loads = [], []
    for _ in range(a.runs):
        shutil.rmtree(out, ignore_errors=True)
        before = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run(["featinv" if shutil.which("featinv") else sys.executable, *([] if shutil.which("featinv")
                        else ["-m", "featinv.cli"]), "predict", "-c", "configs/quickstart.yaml",
                        "--output_dir", str(out), "--model.progress", "false"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        walls.append(time.perf_counter() - t0)
        loads.append((before, os.getloadavg()[0]))
        print(f"run {len(walls)}: {walls[-1]:.1f} s, load average {before:.2f} -> {loads[-1][1]:.2f}", flush=True)
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    readers = {"CNN (guiding)": featinv.build_encoder("zoo:digits-cnn@logits"),
               "ViT (held out)": featinv.build_encoder("zoo:digits-vit@logits")}
    rows = []
    for method in dict.fromkeys(r["method"] for r in recs):
        rs = [r for r in recs if r["method"] == method]
        imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(out / r["image"]).convert("L"), np.float32) / 255)[None]
                            for r in rs])
        labels = torch.tensor([r["label"] for r in rs])
        with torch.no_grad():
            agree = {k: float((m(imgs).argmax(1) == labels).float().mean()) for k, m in readers.items()}
        rows.append((method, len(rs), np.mean([r["final_cos"] for r in rs]), min(r["final_cos"] for r in rs),
                     agree["CNN (guiding)"], agree["ViT (held out)"], rs[0]["nfe"]))
    sha = commit()
    lines = ["# Quickstart (`featinv predict -c configs/quickstart.yaml`)\n",
             f"64 held-out test digits; {os.cpu_count()} CPU cores; torch {torch.__version__}; commit {sha}. "
             f"Command: `python benchmarks/quickstart.py --runs {a.runs}"
             + (f" --threads {a.threads}" if a.threads else "") + "`.\n",
             f"Wall time of the whole command (start-up, model loading, both methods, writing, W&B): runs "
             f"{', '.join(f'{w:.1f}' for w in walls)} s; **median {statistics.median(walls):.1f} s**; load average "
             f"(1 min) before -> after each run: {', '.join(f'{b:.2f} -> {e:.2f}' for b, e in loads)} "
             f"({'quiet cores' if max(max(x) for x in loads) < 1.3 else 'cores SHARED with other jobs: wall inflated'}"
             f"; torch threads: {a.threads or 'default'}).\n",
             "Scored on the saved 8-bit PNGs.\n",
             "| method | n | mean final cosine | min final cosine | CNN label agreement | held-out ViT label agreement | NFE |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {n} | {c:.4f} | {mn:.4f} | {ac:.1%} | {av:.1%} | {nfe} |" for m, n, c, mn, ac, av, nfe in rows]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
