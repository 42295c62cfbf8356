"""Methods x guiding encoders on the embedded digits world: the table featinv exists to produce.

    python benchmarks/methods.py                                   # defaults below, ~minutes on 2 cores
    python benchmarks/methods.py --methods fast,unguided --encoders cnn --n 16 --out /tmp/m

For every guiding encoder (digits CNN penultimate, digits ViT CLS) and method, on the first ``n``
held-out test digits (targets = the guiding encoder's features of those digits):

* final / best cosine and relative L2 (||f - f_s||^2 / ||f_s||^2) under the guiding encoder;
* held-out-encoder agreement: cosine, under the encoder NOT used for guidance, between the
  inversion and the target image;
* label agreement: argmax of the guiding classifier and of the held-out classifier on the
  inversion equals the target's label;
* realism: KID (torchmetrics) between the inversions and all 360 held-out real digits, in the
  held-out encoder's feature space (never the space used for guidance);
* diversity (with >= 2 seeds): mean pixel RMS distance between two seeds' inversions of a target;
* NFE and backward passes per image, seconds per image (wall time / n), process peak RSS.

Writes OUT.csv, OUT.md, OUT.json, a grid OUT_grid.png (targets over each method, CNN-guided) and,
unless --wandb disabled, an offline W&B run with the table.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import commit  # noqa: E402

import featinv  # noqa: E402
from featinv.data import DigitsTargets  # noqa: E402
from featinv.metrics import cosine  # noqa: E402
from featinv.viz import comparison_grid, save_png  # noqa: E402
from featinv.zoo.digits import load_digits  # noqa: E402

ENCODERS = {"cnn": "zoo:digits-cnn@penultimate", "vit": "zoo:digits-vit"}
CLASSIFIERS = {"cnn": "zoo:digits-cnn@logits", "vit": "zoo:digits-vit@logits"}
OTHER = {"cnn": "vit", "vit": "cnn"}
DEFAULT_METHODS = "fast,unguided,pixel,fourier,deepinversion,mpgd,dps,freedom,ugd,tfg"
KID_SUBSET = 50  # samples per KID subset (100 subsets, seed 0)


def kid(fake_feats: torch.Tensor, real_feats: torch.Tensor, subset: int, subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets of ``subset`` samples from each set) via
    torchmetrics, features given directly; the subsets are drawn from a fixed ``seed`` (torchmetrics
    uses the global torch RNG; its state is restored afterwards)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    class Identity(torch.nn.Module):  # torchmetrics takes a feature extractor; ours are precomputed
        num_features = real_feats.shape[1]

        def forward(self, x):
            return x

    m = KernelInceptionDistance(feature=Identity(), subsets=subsets, subset_size=subset, normalize=True)
    m.update(real_feats, real=True)
    m.update(fake_feats, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


def evaluate(method: str, guide: str, images, labels, seeds, encs, clfs, real_feats) -> tuple[dict, torch.Tensor]:
    other = OTHER[guide]
    runs, t0 = [], time.perf_counter()
    for seed in seeds:
        keys = [("digits-test", i) for i in range(len(images))]
        try:
            runs.append(featinv.invert(images, prior=PRIOR, encoder=encs[guide], method=method, seed=seed, keys=keys))
        except featinv.baselines.NotApplicableError as e:
            return {"method": method, "guide": guide, "note": str(e)}, None
    seconds = (time.perf_counter() - t0) / (len(images) * len(seeds))
    with torch.no_grad():
        f_other_target = encs[other](images)
        rows = []
        for r in runs:
            f_other = encs[other](r.images)
            rows.append(dict(
                final_cos=r.final_cos.mean(), best_cos=r.best_cos.mean(), rel_l2=r.final_rel_l2.mean(),
                heldout_cos=cosine(f_other, f_other_target).mean(),
                label_guide=(clfs[guide](r.images).argmax(1) == labels).float().mean(),
                label_heldout=(clfs[other](r.images).argmax(1) == labels).float().mean()))
        # KID over every seed's inversions pooled (n x seeds samples), seeded subsets
        fakes = torch.cat([encs[other](r.images) for r in runs])
        kid_mean, kid_std = kid(fakes, real_feats[other], subset=min(KID_SUBSET, len(fakes)))
    out = {k: float(torch.tensor([float(x[k]) for x in rows]).mean()) for k in rows[0]}
    out["kid"], out["kid_std"] = kid_mean, kid_std
    for k in ("final_cos", "label_heldout"):  # std over seeds of the per-seed means
        out[k + "_std"] = float(torch.tensor([float(x[k]) for x in rows]).std()) if len(rows) > 1 else 0.0
    if len(runs) >= 2:
        out["diversity"] = float((runs[0].images - runs[1].images).pow(2).flatten(1).mean(1).sqrt().mean())
    out.update(method=method, guide=guide, nfe=float(runs[0].nfe.float().mean()),
               backward=float(runs[0].backward.float().mean()), s_per_image=seconds,
               peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return out, runs[0].images


COLS = ["guide", "method", "final_cos", "best_cos", "rel_l2", "heldout_cos", "label_guide", "label_heldout", "kid",
        "diversity", "nfe", "backward", "s_per_image", "peak_rss_gib"]


def markdown(rows, meta) -> str:
    fmt = {"nfe": "{:.0f}", "backward": "{:.0f}", "s_per_image": "{:.3f}", "kid": "{:.4f}", "peak_rss_gib": "{:.2f}"}
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]

    def cell(r, c):
        if not isinstance(r.get(c), float):
            return str(r.get(c, ""))
        f = fmt.get(c, "{:.3f}")
        return f.format(r[c]) + (" ± " + f.format(r[c + "_std"]) if isinstance(r.get(c + "_std"), float) else "")

    for r in rows:
        if "note" in r:
            lines.append(f"| {r['guide']} | {r['method']} | n/a: {r['note']} |" + " |" * (len(COLS) - 3))
            continue
        lines.append("| " + " | ".join(cell(r, c) for c in COLS) + " |")
    return (f"# Methods x encoders on the embedded digits world\n\n{meta['n']} held-out test digits, seeds "
            f"{meta['seeds']}; machine: {meta['machine']}; torch {meta['torch']}; commit {meta['commit']}.\n"
            f"Command: `{meta['command']}`\n\nguide = encoder whose feature is inverted; heldout_* = the other "
            "encoder (never used for guidance); kid = KID vs the 360 real test digits in the held-out encoder's "
            "space (all seeds' inversions pooled; mean ± std over 100 random subsets of " + str(KID_SUBSET) + " per set, "
            "subsets drawn from seed 0); final_cos and label_heldout: mean ± std over seeds of the per-seed means; "
            "label_* = fraction whose predicted label equals the target's; diversity = pixel RMS between "
            "two seeds; nfe = prior evaluations (diffusion) or encoder passes (baselines) per image; peak_rss = "
            "process peak so far.\n\n" + "\n".join(lines) + "\n")


def main():
    global PRIOR
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--encoders", default="cnn,vit")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/methods")
    ap.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    PRIOR = featinv.build_prior("zoo:digits-ddpm")
    encs = {k: featinv.build_encoder(v) for k, v in ENCODERS.items()}
    clfs = {k: featinv.build_encoder(v) for k, v in CLASSIFIERS.items()}
    targets = DigitsTargets("test", limit=a.n)
    images, labels = targets.images, targets.labels
    real, _ = load_digits("test")
    with torch.no_grad():
        real_feats = {k: e(real) for k, e in encs.items()}
    seeds = [int(s) for s in a.seeds.split(",")]
    rows, grid_rows = [], {}
    for guide in a.encoders.split(","):
        for method in a.methods.split(","):
            row, imgs = evaluate(method, guide, images, labels, seeds, encs, clfs, real_feats)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if imgs is not None and guide == a.encoders.split(",")[0]:
                grid_rows[method] = imgs[:16]
    la = os.getloadavg()
    meta = dict(n=a.n, seeds=seeds, machine=f"{platform.machine()}, {os.cpu_count()} cores, {a.threads} torch threads; "
                f"shared cores (other jobs running; this one at nice {os.nice(0)}), load average {la[0]:.1f} at the end",
                torch=torch.__version__, commit=commit(), command="python benchmarks/methods.py " + " ".join(
                    f"--{k} {v}" for k, v in vars(a).items()))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS + ["kid_std", "final_cos_std", "label_heldout_std", "note"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    json.dump({"meta": meta, "rows": rows}, open(a.out + ".json", "w"), indent=1)
    open(a.out + ".md", "w").write(markdown(rows, meta))
    save_png(comparison_grid([images[:16]] + list(grid_rows.values()), min_size=32), a.out + "_grid.png")
    (open(a.out + "_grid.txt", "w").write("rows: target, " + ", ".join(grid_rows) + "\n"))
    if a.wandb != "disabled":
        import wandb

        run = wandb.init(project="featinv-benchmarks", name=os.path.basename(a.out), mode=a.wandb,
                         dir=os.path.dirname(a.out) or ".", config=meta)
        run.log({"methods": wandb.Table(columns=COLS, data=[[r.get(c) for c in COLS] for r in rows]),
                 "grid": wandb.Image(a.out + "_grid.png")})
        run.finish()
    print(markdown(rows, meta))



PRIOR = None

if __name__ == "__main__":
    main()
