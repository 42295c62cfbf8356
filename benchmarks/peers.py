"""Peer benchmark: featinv's Fourier / pixel baselines against the tools users would pick instead.

    python -m pip install -e ".[peers]"     # torch-lucent (+ kornia<=0.4.1), horama (+ einops)
    python benchmarks/peers.py --split val  --n 32 --seeds 0,1   --tools fourier,fourier-crop,fourier-bg,fourier-crop-bg
    python benchmarks/peers.py --split test --n 32 --seeds 0,1,2 # every tool

Same targets for every tool: the digits CNN's 64-d penultimate feature of the first n digits of a
split; 512 optimisation steps (Lucid's ``render_vis`` default; featinv ``pixel`` keeps its own 300);
every tool's transforms are scaled from their native image size to 16 px. Scored identically: final
cosine to the target under the guiding CNN (on the final, untransformed image) and the held-out
digits ViT evaluator (``vit=zoo:digits-vit@logits``, never guides: ``agree`` = it reads the target's
digit, ``cos``). Mean ± std over seeds of the per-seed means.

Tools:
* ``fourier`` / ``fourier-notf``: featinv's FourierVisualization (Lucid's parametrisation and
  standard transforms scaled to 16 px), with / without transforms. How the padded, warped view is
  brought back to 16 px was chosen on ``--split val`` (peers_val.md, run when the default was
  ``resize``: there ``fourier`` = ``fourier-resize``): ``fourier-crop`` (a central crop, now the
  default ``fit``) or ``fourier-resize`` (the previous default: a resize, which shrinks the content);
  ``-bg`` pads with the digits' background (0) instead of Lucid's grey; ``fourier-weak`` halves
  every transform.
* ``pixel``: featinv's Mahendran & Vedaldi baseline (300 steps).
* ``lucent`` / ``lucent-notf``: torch-lucent 0.1.8, ``param.image(16, channels=1, batch=n)`` (FFT +
  sigmoid), Adam lr 0.05, ``transform.standard_transforms`` scaled by 16/128 (pad 2 grey, jitter 2,
  scales 0.9-1.1, rotations -10..10 degrees, jitter 2; ``jitter`` needs d > 1) then an upsample back
  to 16 px (``render_vis(fixed_image_size=16)``'s own step), ``preprocess=False`` (its ImageNet
  normalisation breaks on 1 channel and the digits models take [0, 1]); the loop is render_vis's.
* ``horama``: horama 0.3.0 ``fourier`` (Lucid-style FFT, NAdam lr 1, decay 1.5, 6 random crops per
  step with noise), ``image_size`` = ``model_input_size`` = 16, crop boxes scaled so that a crop
  covers about the whole 16-px image (``box_size`` (0.95, 1.0); horama's (0.20, 0.25) are for
  1280 px rendered and cropped to 224), ``values_range`` (0, 1); horama renders 3 channels only:
  the CNN sees their mean. One target at a time (horama optimises one image). horama's MACO is
  skipped: it downloads an ImageNet spectrum at run time.

Writes benchmarks/results/peers[_val].{md,json}.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import commit  # noqa: E402

import featinv  # noqa: E402
from featinv.data import DigitsTargets  # noqa: E402
from featinv.evaluators import build_evaluator, evaluate  # noqa: E402
from featinv.metrics import cosine  # noqa: E402

STEPS = 512
FEATINV = {"fourier": {}, "fourier-notf": {"transforms": False}, "fourier-crop": {"fit": "crop"},
           "fourier-resize": {"fit": "resize"}, "fourier-bg": {"fit": "resize", "pad_value": 0.0},
           "fourier-crop-bg": {"fit": "crop", "pad_value": 0.0},
           "fourier-weak": {"pad": 6 / 128, "jitter": 4 / 128, "scale": (0.95, 1.05), "rotate": 5.0, "jitter2": 2 / 128}}


def run_featinv(tool, images, enc, prior, seed):
    if tool == "pixel":
        method = featinv.get_method("pixel")
    else:
        method = featinv.get_method("fourier", name=tool, steps=STEPS, **FEATINV[tool])
    keys = [("peers", i) for i in range(len(images))]
    r = featinv.invert(images, prior=prior, encoder=enc, method=method, keys=keys, seed=seed)
    return r.images


def run_lucent(tool, images, enc, target, seed):
    from lucent.optvis import param, transform

    np.random.seed(seed)
    torch.manual_seed(seed)
    params, image_f = param.image(16, channels=1, batch=len(images))
    opt = torch.optim.Adam(params, lr=5e-2)
    tf = [] if tool == "lucent-notf" else [
        transform.pad(2, mode="constant", constant_value=0.5), transform.jitter(2),
        transform.random_scale([1 + (i - 5) / 50.0 for i in range(11)]),
        transform.random_rotate(list(range(-10, 11)) + 5 * [0]), transform.jitter(2)]
    tf = transform.compose(tf + [torch.nn.Upsample(size=16, mode="bilinear", align_corners=True)])
    for _ in range(STEPS):  # render_vis's loop, with a feature-matching objective
        def closure():
            opt.zero_grad()
            loss = (enc(tf(image_f())) - target).pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
    with torch.no_grad():
        return image_f().detach()


def run_horama(images, enc, target, seed):
    from horama import fourier

    out = []
    for i in range(len(images)):
        torch.manual_seed(seed * 100003 + i)
        t = target[i:i + 1]

        def objective(crops):  # (k, 3, 16, 16) -> score to maximise
            return -(enc(crops.mean(1, keepdim=True)) - t).pow(2).sum(1).mean()

        with contextlib.redirect_stderr(io.StringIO()):
            img, _ = fourier(objective, total_steps=STEPS, image_size=16, model_input_size=16,
                             values_range=(0.0, 1.0), box_size=(0.95, 1.0), device="cpu")
        out.append(img.detach().mean(0, keepdim=True))
    return torch.stack(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", choices=["val", "test"], default="test")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tools", default="fourier,fourier-notf,pixel,lucent,lucent-notf,horama")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default="benchmarks/results")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prior = featinv.build_prior("zoo:digits-ddpm")
    enc = featinv.build_encoder("zoo:digits-cnn@penultimate")
    ev = build_evaluator("vit=zoo:digits-vit@logits")
    ds = DigitsTargets(a.split, limit=a.n)
    images = ds.images
    with torch.no_grad():
        target = enc(images)
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    out = Path(a.results) / ("peers_val" if a.split == "val" else "peers")
    for tool in a.tools.split(","):
        per_seed = []
        for seed in seeds:
            t0 = time.perf_counter()
            if tool.startswith("lucent"):
                imgs = run_lucent(tool, images, enc, target, seed)
            elif tool == "horama":
                imgs = run_horama(images, enc, target, seed)
            else:
                imgs = run_featinv(tool, images, enc, prior, seed)
            wall = time.perf_counter() - t0
            imgs = imgs.clamp(0, 1)
            with torch.no_grad():
                cos = cosine(enc(imgs), target)
            s = evaluate([ev], imgs, images)
            per_seed.append(dict(seed=seed, final_cos=float(cos.mean()), min_cos=float(cos.min()),
                                 vit_agree=float(s["eval/vit/agree"].mean()), vit_cos=float(s["eval/vit/cos"].mean()),
                                 s_per_image=wall / len(images)))
            print(json.dumps({"tool": tool, **per_seed[-1]}), flush=True)
        row = {"tool": tool, "per_seed": per_seed}
        for k in ("final_cos", "vit_agree", "vit_cos", "s_per_image"):
            v = [p[k] for p in per_seed]
            row[k], row[k + "_std"] = statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)
        row["min_cos"] = min(p["min_cos"] for p in per_seed)
        rows.append(row)
        write(a, out, rows)


def write(a, out, rows):
    import importlib.metadata as md

    def version(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "not installed"

    la = os.getloadavg()
    cmd = f"python benchmarks/peers.py --split {a.split} --n {a.n} --seeds {a.seeds} --tools {a.tools} --threads {a.threads}"
    meta = dict(commit=commit(), command=cmd, split=a.split, n=a.n, seeds=a.seeds, steps=STEPS,
                versions={p: version(p) for p in ("torch", "torch-lucent", "kornia", "horama")},
                machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {a.threads} torch thread(s)",
                load=f"shared cores (other jobs running; this one at nice {os.nice(0)}), load average {la[0]:.1f} at the end")
    Path(str(out) + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Peers: featinv's AM baselines vs torch-lucent and horama ({a.n} {a.split} digits, seeds {a.seeds})\n",
             f"Commit {meta['commit']}; command `{cmd}`; {meta['machine']}; {meta['load']}; versions "
             f"{meta['versions']}. Target: digits CNN penultimate (64-d); {STEPS} steps (pixel: 300); final cosine "
             "on the final untransformed image; held-out ViT evaluator. Mean ± std over seeds of per-seed means; min "
             "over all. Tool settings: see the docstring of benchmarks/peers.py.\n",
             "| tool | final cos | min final cos | ViT agree | ViT cos | s/image |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['final_cos']:.4f} ± {r['final_cos_std']:.4f} | {r['min_cos']:.4f} | "
                     f"{r['vit_agree']:.3f} ± {r['vit_agree_std']:.3f} | {r['vit_cos']:.4f} ± {r['vit_cos_std']:.4f} | "
                     f"{r['s_per_image']:.3f} |")
    Path(str(out) + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
