"""Is the embedded digits prior a real prior? Unguided samples judged by the embedded classifiers.

    HF_HUB_OFFLINE=1 python benchmarks/zoo_prior.py [--n 256] [--seed 0] [--sampler ddim100|ddpm1000]

Draws ``--n`` unguided samples from ``featinv/zoo/weights/digits-ddpm`` and reports

* the fraction the digits CNN classifies with softmax >= 0.9, and the histogram of its predictions
  (a prior that generates digits gives confident predictions of all ten classes);
* KID (Binkowski et al. 2018; torchmetrics ``KernelInceptionDistance``: cubic polynomial kernel, mean
  over random subsets) against the 360 held-out test digits, in the feature space of the digits ViT
  (its (B, 64) CLS embedding after the final LayerNorm, ``VIT_FEATURE_LAYER``), not Inception. With a
  custom feature module torchmetrics passes the images through unchanged (its ``normalize`` only
  applies to the built-in Inception), so the module receives float images in [0, 1] as the ViT expects.
  For context, the same KID for: train-split digits (a floor: real digits the models did see), blurred
  train digits and uniform noise (ceilings);
* the median L2 distance of each sample to its nearest training image next to the same for test
  images, and the fraction of samples nearer a train image than the closest 5% of test digits are
  (a memorisation check: samples much closer to the train set than held-out digits are copies).

Writes ``benchmarks/results/zoo_prior.{md,json}`` and a 8x8 grid of the first 64 samples
(``zoo_prior_grid.png``, upscaled x4 with nearest neighbour).
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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from featinv.zoo import digits as D  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class ViTCLSFeatures(nn.Module):
    """Images (B, 1, 16, 16) float in [0, 1] -> digits-ViT CLS embedding after the final norm, (B, 64)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # in case a caller passes 8-bit images
            x = x.float() / 255
        return self.vit.forward_head(self.vit.forward_features(x.float()), pre_logits=True)


@torch.no_grad()
def sample(unet, sched, n: int, seed: int, sampler: str, batch: int = 128) -> torch.Tensor:
    """Unguided samples in [0, 1], (n, 1, 16, 16)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    gen = torch.Generator().manual_seed(seed)
    if sampler == "ddim100":
        s, steps, kw = DDIMScheduler.from_config(sched.config, clip_sample=False), 100, dict(eta=1.0)
    elif sampler == "ddpm1000":
        s, steps, kw = DDPMScheduler.from_config(sched.config, clip_sample=False), 1000, {}
    else:
        raise ValueError(sampler)
    s.set_timesteps(steps)
    out = []
    for i in range(0, n, batch):
        x = torch.randn((min(batch, n - i), 1, D.IMAGE_SIZE, D.IMAGE_SIZE), generator=gen)
        for t in s.timesteps:
            eps = unet(x, t).sample
            x = s.step(eps, t, x, generator=gen, **kw).prev_sample
        out.append((x / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def kid(feat: nn.Module, real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int, seed: int):
    from torchmetrics.image.kid import KernelInceptionDistance

    m = KernelInceptionDistance(feature=feat, subsets=subsets, subset_size=subset_size)
    m.update(real, real=True)
    m.update(fake, real=False)
    torch.manual_seed(seed)  # the subsets are drawn with torch.randperm
    mean, std = m.compute()
    return float(mean), float(std)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(p)


def nn_dist(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.flatten(1), ref.flatten(1)).min(1).values


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=["ddim100", "ddpm1000"], default="ddim100")
    p.add_argument("--subset-size", type=int, default=200)
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--weights", type=Path, default=D.WEIGHTS_DIR, help="folder with the three digits models")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torchvision

    unet, sched = D.load_digits_ddpm(args.weights / D.DDPM_DIR)
    cnn, vit = D.load_digits_cnn(args.weights / D.CNN_FILE), D.load_digits_vit(args.weights / D.VIT_FILE)
    xtr, _ = D.load_digits("train")
    xte, _ = D.load_digits("test")

    t0 = time.time()
    imgs = sample(unet, sched, args.n, args.seed, args.sampler)
    t_sample = time.time() - t0
    print(f"sampled {args.n} images with {args.sampler} in {t_sample:.0f}s", flush=True)

    with torch.no_grad():
        prob = cnn(imgs).softmax(1)
        prob_te = cnn(xte).softmax(1)
    conf, pred = prob.max(1)
    hist = torch.bincount(pred, minlength=10).tolist()
    confident = float((conf >= 0.9).float().mean())
    confident_te = float((prob_te.max(1).values >= 0.9).float().mean())

    feat = ViTCLSFeatures(vit)
    g = torch.Generator().manual_seed(args.seed + 1)
    n_ref = args.n
    train_ref = xtr[torch.randperm(len(xtr), generator=g)[:n_ref]]
    blurred = torchvision.transforms.functional.gaussian_blur(train_ref, kernel_size=7, sigma=2.0)
    noise = torch.rand(train_ref.shape, generator=g)
    ss = min(args.subset_size, n_ref, len(xte))
    kids = {}
    for name, fake in (("prior samples", imgs), ("train digits (floor)", train_ref),
                       ("blurred train digits, Gaussian sigma=2 px", blurred), ("uniform noise (ceiling)", noise)):
        kids[name] = kid(feat, xte, fake, ss, args.subsets, args.seed)
        print(f"KID vs test [{name}]: {kids[name][0]:.4f} +- {kids[name][1]:.4f}", flush=True)

    ds, dt = nn_dist(imgs, xtr), nn_dist(xte, xtr)
    d_samples, d_test = ds.median().item(), dt.median().item()
    q05 = torch.quantile(dt, 0.05).item()
    near_copy = float((ds < q05).float().mean())  # ~0.05 if samples are no closer to train than test digits

    args.out.mkdir(parents=True, exist_ok=True)
    grid = torchvision.utils.make_grid(imgs[:64], nrow=8, padding=2, pad_value=0.5)
    grid = F.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
    torchvision.utils.save_image(grid, args.out / "zoo_prior_grid.png")

    import diffusers
    import timm
    import torchmetrics

    command = " ".join(["HF_HUB_OFFLINE=1 python benchmarks/zoo_prior.py",
                        *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])
    sampler_desc = {"ddim100": "DDIMScheduler.from_config(prior scheduler config, clip_sample=False), 100 steps, eta=1.0",
                    "ddpm1000": "DDPMScheduler ancestral sampling, all 1000 steps, clip_sample=False"}[args.sampler]
    res = dict(command=command, seed=args.seed, n_samples=args.n, sampler=sampler_desc,
               sampling_seconds=round(t_sample, 1),
               machine=f"{platform.machine()} CPU, torch.set_num_threads({args.threads})",
               versions=dict(torch=torch.__version__, diffusers=diffusers.__version__, timm=timm.__version__,
                             torchmetrics=torchmetrics.__version__),
               confident_fraction=confident, confident_threshold=0.9, confident_fraction_test_digits=confident_te,
               cnn_class_histogram=hist, classes_present=sum(h > 0 for h in hist),
               kid_feature="digits-ViT CLS embedding after final LayerNorm (64-d), images float in [0, 1]",
               kid_reference=f"{len(xte)} held-out test digits", kid_subset_size=ss, kid_subsets=args.subsets,
               kid={k: dict(mean=round(v[0], 5), std=round(v[1], 5)) for k, v in kids.items()},
               median_nn_l2_to_train=dict(samples=round(d_samples, 3), test_digits=round(d_test, 3)),
               fraction_samples_closer_to_train_than_5pct_of_test=round(near_copy, 4),
               weights=_rel(args.weights), grid=f"{_rel(args.out / 'zoo_prior_grid.png')} (first 64 samples, x4 nearest)")
    (args.out / "zoo_prior.json").write_text(json.dumps(res, indent=2) + "\n")

    md = [
        "# Digits prior: unguided samples",
        "",
        f"Command: `{command}`  ",
        f"Machine: {res['machine']}; versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + "  ",
        f"Sampler: {sampler_desc}; {args.n} samples, seed {args.seed} ({t_sample:.0f} s).  ",
        f"Prior: `{_rel(args.weights / D.DDPM_DIR)}` (trained on the 1,437 train digits only); CNN and ViT from "
        f"`{_rel(args.weights)}`.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| CNN softmax >= 0.9 (samples) | {confident:.3f} |",
        f"| CNN softmax >= 0.9 (real test digits, reference) | {confident_te:.3f} |",
        f"| classes predicted (of 10) | {res['classes_present']} |",
        f"| CNN prediction histogram 0..9 | {' '.join(map(str, hist))} |",
        f"| median L2 to nearest train image: samples / test digits | {d_samples:.3f} / {d_test:.3f} |",
        f"| samples nearer a train image than the closest 5% of test digits ({q05:.3f}) | {near_copy:.3f} (0.05 = no closer than held-out digits) |",
        "",
        f"KID vs the {len(xte)} held-out test digits in digits-ViT CLS feature space "
        f"(subset size {ss}, {args.subsets} subsets; mean +- std over subsets; lower is closer):",
        "",
        "| images | KID |",
        "|---|---|",
        *[f"| {k} | {v[0]:.4f} +- {v[1]:.4f} |" for k, v in kids.items()],
        "",
        "![samples](zoo_prior_grid.png)",
        "",
    ]
    (args.out / "zoo_prior.md").write_text("\n".join(md))
    print("\n".join(md))
    return res


if __name__ == "__main__":
    main()
