"""Pool ``shapes_validity.py`` CSVs of disjoint seeds and compare runs (e.g. two decoders of the prior).

    python benchmarks/shapes_validity_pool.py --run "committed decoder" benchmarks/results/shapes_validity.csv \
        benchmarks/results/shapes_validity_s23.csv --run "previous decoder" PREV_S01.csv \
        benchmarks/results/shapes_validity_s23_prev_decoder.csv --out benchmarks/results/shapes_validity_decoder.md

Each CSV holds one ``--seeds`` set of the same encoders and scenes. Pooled agreement a_k and chance c_k are the
means over the CSVs (each has the same number of inversions), retention r_k = (a_k - c_k) / (1 - c_k) as in
``shapes_validity.py``; Spearman(r_k, probe accuracy) over the (encoder, factor) pairs, per CSV and pooled.
How much the Spearman moves between seed sets is the noise any difference between runs must exceed.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import sys
from pathlib import Path

from scipy.stats import spearmanr

FACTORS = ("shape", "color", "size", "position", "background")


def load(path: str, method: str) -> dict[str, dict]:
    rows = {r["encoder"]: r for r in csv.DictReader(open(path)) if r["method"] == method}
    if not rows:
        sys.exit(f"{path}: no rows of method {method!r}")
    return rows


def pooled(tables: list[dict[str, dict]]) -> tuple[dict, list[float], list[list[float]]]:
    """{(encoder, factor): pooled r}, the probe accuracies and each table's own r, in one pair order."""
    pairs = [(e, f) for e in tables[0] for f in FACTORS]
    r, probe, own = {}, [], [[] for _ in tables]
    for e, f in pairs:
        a = sum(float(t[e][f"a_{f}"]) for t in tables) / len(tables)
        c = sum(float(t[e][f"c_{f}"]) for t in tables) / len(tables)
        r[e, f] = (a - c) / (1 - c)
        probe.append(float(tables[0][e][f"probe_{f}"]))
        for i, t in enumerate(tables):
            own[i].append(float(t[e][f"r_{f}"]))
    return r, probe, own


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", nargs="+", action="append", required=True, metavar=("NAME", "CSV"),
                    help="a run's name and its CSVs (one per seed set)")
    ap.add_argument("--method", default="fast-w1-inc")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--note", default="", help="a paragraph for the page (where the CSVs came from)")
    a = ap.parse_args(argv)
    lines = [f"# Inversion validity pooled over seed sets (method `{a.method}`)\n",
             "Command: `python benchmarks/shapes_validity_pool.py " + shlex.join(sys.argv[1:]) + "`\n",
             *([a.note + "\n"] if a.note else []),
             "| run | Spearman per CSV | Spearman pooled | pooled r: " + " | ".join(
                 f"{e} {f}" for e, f in (("shape", "shape"), ("color", "color"), ("invariant", "size"))) + " |",
             "|---|---|---|---|---|---|"]
    for name, *paths in a.run:
        tables = [load(p, a.method) for p in paths]
        r, probe, own = pooled(tables)
        per = ", ".join(f"{spearmanr(o, probe)[0]:.3f} ({Path(p).name})" for o, p in zip(own, paths))
        rho = spearmanr(list(r.values()), probe)[0]
        lines.append(f"| {name} | {per} | {rho:.3f} | {r['shape', 'shape']:.3f} | {r['color', 'color']:.3f} | "
                     f"{r['invariant', 'size']:.3f} |")
    md = "\n".join(lines) + "\n"
    if a.out:
        a.out.write_text(md)
    print(md)
    return md


if __name__ == "__main__":
    main()
