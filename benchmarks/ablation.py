"""Run an ablation config (configs/ablations/*.yaml) and summarise it as a table.

    python benchmarks/ablation.py configs/ablations/weight.yaml [more.yaml ...] [--n 32]

Each config runs through the real CLI (``featinv predict``), so it writes the output contract and an
offline W&B run grouped as ``ablation-<name>``; this script then reads results.jsonl and adds the
held-out ViT's label agreement. Writes benchmarks/results/ablation_<name>.{md,csv}.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

import featinv  # noqa: E402

COLS = ["method", "n", "final_cos", "best_cos", "final_rel_l2", "vit_label_agreement", "nfe", "s_per_image"]


def summarise(out_dir: Path, vit) -> list[dict]:
    groups = defaultdict(list)
    for line in (out_dir / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "skipped" not in r:
            groups[r["method"]].append(r)
    rows = []
    for method, rs in groups.items():  # in config order
        imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(out_dir / r["image"]).convert("L"),
                                                        dtype="float32") / 255)[None] for r in rs])
        with torch.no_grad():
            agree = (vit(imgs).argmax(1) == torch.tensor([r["label"] for r in rs])).float().mean()
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        rows.append(dict(method=method, n=len(rs), final_cos=mean("final_cos"), best_cos=mean("best_cos"),
                         final_rel_l2=mean("final_rel_l2"), vit_label_agreement=float(agree), nfe=mean("nfe"),
                         s_per_image=mean("seconds")))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--n", type=int, default=None, help="override the number of targets")
    ap.add_argument("--results", default="benchmarks/results")
    a = ap.parse_args()
    vit = featinv.build_encoder("zoo:digits-vit@logits")
    for cfg in a.configs:
        name, source = Path(cfg).stem, cfg
        out = Path("outputs/ablations") / name
        extra = ["--output_dir", str(out), "--model.progress", "false"]
        if a.n:  # a reduced copy of the config: the first dataset limited to n targets
            spec = yaml.safe_load(Path(cfg).read_text())
            spec["data"]["datasets"][0]["init_args"]["limit"] = a.n
            cfg = str(out.parent / f"{name}_n{a.n}.yaml")
            out.parent.mkdir(parents=True, exist_ok=True)
            Path(cfg).write_text(yaml.safe_dump(spec))
        if (out / "results.jsonl").exists():
            (out / "results.jsonl").unlink()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "featinv.cli", "predict", "-c", cfg, *extra], check=True)
        rows = summarise(out, vit)
        wall = time.perf_counter() - t0
        os.makedirs(a.results, exist_ok=True)
        with open(f"{a.results}/ablation_{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLS)
            w.writeheader()
            w.writerows(rows)
        md = [f"# Ablation `{name}` ({source})\n", f"Command: `python benchmarks/ablation.py {source}"
              + (f" --n {a.n}" if a.n else "") + f"`; wall {wall:.0f} s on {os.cpu_count()} CPU cores. "
              "vit_label_agreement: the held-out digits ViT (never used for guidance) reads the target's "
              "label from the inversion.\n", "| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
        md += ["| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in COLS) + " |"
               for r in rows]
        Path(f"{a.results}/ablation_{name}.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))


if __name__ == "__main__":
    main()
