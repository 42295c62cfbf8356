"""``featinv report DIR [DIR ...]``: one comparison table over results directories.

Rows are (dataset, encoder, method) over every directory given (any encoders, methods, worlds);
columns: records, mean ± std final cosine, best cosine, NFE, s/image, and the mean of every
evaluator score (``eval/<name>/<metric>``). For evaluator agreements, ``retention`` rescales
agreement by the chance level measured in the same directory and dataset by the ``unguided``
method (r = (a - a_unguided) / (1 - a_unguided)), when that method is there. Markdown and CSV.
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path

from featinv import results as R

__all__ = ["load", "compare", "to_markdown", "to_csv"]

GROUP = ("dataset", "encoder", "method")


def load(dirs: list[str | Path]) -> list[dict]:
    """The latest record per key of each directory, tagged with ``run`` (the directory)."""
    out = []
    for d in dirs:
        d = Path(d)
        if not (d / R.RESULTS).exists():
            raise FileNotFoundError(f"{d} has no {R.RESULTS}: give a featinv output directory")
        out += [{**r, "run": str(d)} for r in R.latest(R.read_dir(d)).values() if "skipped" not in r]
    return out


def _stats(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def compare(records: list[dict]) -> tuple[list[str], list[dict]]:
    """(columns, rows) of the comparison table."""
    groups = defaultdict(list)
    for r in records:
        groups[tuple(r.get(k) for k in GROUP)].append(r)
    evals = sorted({k for r in records for k in r if k.startswith("eval/")})
    chance = {}
    for (d, e, m), rs in groups.items():
        if m == "unguided":
            for k in evals:
                chance[(rs[0]["run"], d, k)] = _stats([r.get(k) for r in rs])[0]
    rows = []
    for (d, e, m), rs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        row = {"dataset": d, "encoder": e, "method": m, "n": len(rs)}
        for k in ("final_cos", "best_cos"):
            mean, std = _stats([r.get(k) for r in rs])
            row[k] = mean
            row[k + "_std"] = std
        row["nfe"] = _stats([r.get("nfe") for r in rs])[0]
        row["s_per_image"] = _stats([r.get("seconds") for r in rs])[0]
        for k in evals:
            a = _stats([r.get(k) for r in rs])[0]
            row[k] = a
            c = chance.get((rs[0]["run"], d, k))
            if a is not None and c is not None and c < 1 and not k.endswith(("_conf", "_value", "/cos", "/conf")):
                row[k.replace("eval/", "retention/")] = (a - c) / (1 - c)
        rows.append(row)
    cols = list(dict.fromkeys(k for row in rows for k in row))
    return cols, rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.0f}" if v.is_integer() and abs(v) >= 1 else (f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}")
    return str(v)


def to_markdown(cols: list[str], rows: list[dict]) -> str:
    shown = [c for c in cols if not c.endswith("_std")]
    head = "| " + " | ".join(shown) + " |\n|" + "---|" * len(shown) + "\n"
    body = ""
    for r in rows:
        cells = []
        for c in shown:
            v = _fmt(r.get(c))
            if r.get(c + "_std") is not None and v:
                v += f" ± {r[c + '_std']:.4f}"
            cells.append(v)
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def to_csv(cols: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows([{c: r.get(c) for c in cols} for r in rows])
    return buf.getvalue()
