"""Hard vs straight-through clamp of the decoded image inside the guidance loss (issue 11).

    python benchmarks/decode_clamp.py [--n 32]

The reference implementation of Shirahama et al. (2025) clamps the decoded x0-hat to [0, 1] with a
plain clamp: pixels outside the range get zero gradient. At t ~ T x0-hat is mostly saturated, so
the first guided steps are almost unguided there. featinv's ``decode_clamp: straight_through``
keeps the forward values and passes the gradient through. This measures, on the digits world
(prior ``zoo:digits-ddpm``, encoder ``zoo:digits-cnn@penultimate``, the first ``--n`` test digits,
seed 0):

* at the first steps of the paper's schedule (t = 999, 998, ...): the share of saturated x0-hat
  pixels and the guidance gradient norm ||dL/dz_t|| under each clamp;
* the final and best cosine of the ``fast`` preset and of a reduced paper schedule (100 DDPM
  steps, K = 8, K = 100 on the first 5) under each clamp.

Writes benchmarks/results/decode_clamp.md (+ .json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import commit  # noqa: E402

import featinv  # noqa: E402
from featinv.contract import make_generators, randn  # noqa: E402
from featinv.data import DigitsTargets  # noqa: E402

REDUCED_PAPER = dict(steps=100, recurrence=8, early_steps=5, early_recurrence=100)


def first_step_stats(prior, enc, target, gens, clamp: str, ts=(999, 989, 949, 899)) -> dict:
    """Saturated share of x0-hat and ||dL/dz_t|| at a few early timesteps, from z_t ~ N(0, I)."""
    out = {}
    z = randn(gens, prior.latent_shape)
    for t in ts:
        a = float(prior.alphas_cumprod[t])
        zt = z.clone().requires_grad_(True)
        eps = prior.eps(zt, t)
        x0 = (zt - math.sqrt(1 - a) * eps) / math.sqrt(a)
        loss = (enc(prior.decode(x0, clamp=clamp)) - target).pow(2).sum(1)
        (g,) = torch.autograd.grad(loss.sum(), zt)
        out[t] = dict(saturated=float((x0.abs() > 1).float().mean()), grad_norm=float(g.flatten(1).norm(dim=1).mean()))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/decode_clamp")
    a = ap.parse_args()
    torch.set_num_threads(2)
    prior = featinv.build_prior("zoo:digits-ddpm")
    enc = featinv.build_encoder("zoo:digits-cnn@penultimate")
    targets = DigitsTargets("test", limit=a.n)
    keys = [(targets.name, i) for i in range(a.n)]
    with torch.no_grad():
        f = enc(targets.images)
    stats = {c: first_step_stats(prior, enc, f, make_generators(range(a.n)), c) for c in ("hard", "straight_through")}
    rows = []
    for preset, kw in (("fast", {}), ("shirahama2025", REDUCED_PAPER)):
        for clamp in ("hard", "straight_through"):
            t0 = time.perf_counter()
            r = featinv.invert(f, prior=prior, encoder=enc, method=preset, keys=keys, seed=0, decode_clamp=clamp, **kw)
            rows.append(dict(preset=preset + ("" if not kw else " (100 steps, K=8, K=100 on 5)"), clamp=clamp,
                             final_cos=float(r.final_cos.mean()), final_cos_min=float(r.final_cos.min()),
                             best_cos=float(r.best_cos.mean()), nfe=int(r.nfe[0]),
                             s_per_image=(time.perf_counter() - t0) / a.n))
            print(json.dumps(rows[-1]), flush=True)
    meta = dict(n=a.n, seed=0, commit=commit(), command=f"python benchmarks/decode_clamp.py --n {a.n}",
                machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads 2", torch=torch.__version__)
    with open(a.out + ".json", "w") as fh:
        json.dump(dict(meta=meta, first_steps=stats, rows=rows), fh, indent=1)
    lines = ["# Decoded-image clamp inside the guidance loss: hard (reference) vs straight-through\n",
             f"Commit `{meta['commit']}`, `{meta['command']}`, seed 0, {a.n} test digits, {meta['machine']}.",
             "Prior `zoo:digits-ddpm`, encoder `zoo:digits-cnn@penultimate` (its own feature is the target).\n",
             "## At the first steps (z_t ~ N(0, I), before any guidance)\n",
             "| t | saturated x0-hat pixels | ‖dL/dz_t‖ hard | ‖dL/dz_t‖ straight-through |", "|---|---|---|---|"]
    for t in stats["hard"]:
        h, s = stats["hard"][t], stats["straight_through"][t]
        lines.append(f"| {t} | {h['saturated']:.1%} | {h['grad_norm']:.4g} | {s['grad_norm']:.4g} |")
    lines += ["\n## Whole runs\n", "| preset | clamp | final cos (min) | best cos | NFE | s/image |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['clamp']} | {r['final_cos']:.4f} ({r['final_cos_min']:.4f}) | "
                     f"{r['best_cos']:.4f} | {r['nfe']} | {r['s_per_image']:.2f} |")
    with open(a.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
