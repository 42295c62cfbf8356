"""Train the embedded digits models from scratch and save them into the weights folder.

    python -m featinv.zoo.train                        # all three, into featinv/zoo/weights/
    python -m featinv.zoo.train --what cnn,vit --out /tmp/w --seed 1
    python -m featinv.zoo.train --what prior --prior-steps 500   # a quick, weaker prior
    python -m featinv.zoo.train --what shapes                    # the shapes world (featinv.zoo.shapes.train)

Every model is seeded (``torch.manual_seed(seed)`` for the initialisation, one ``torch.Generator``
seeded with ``seed`` for the data order, augmentation, noise and timesteps), trains on the train split
only (``featinv.zoo.digits.load_digits("train")``) and is evaluated on the 360 held-out test images.
``meta.json`` in the output folder records, per model, the split, the schedule, the seed, the parameter
count, the wall time, the accuracy (classifiers) and the exact command line; entries of models not
retrained are kept. Results are reproducible on one machine; across CPUs and library versions the
floating-point order may differ.

Plain PyTorch, no lightning. On 2 uncontended CPU cores (x86-64, torch 2.14) the CNN takes ~20 s, the ViT
~100 s and the prior ~0.54 s/step, ~27 min for the default 3,000 steps: ~30 min in all.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from featinv.zoo import digits as D
from featinv.zoo.provenance import command_line, env_info, update_meta  # noqa: F401 (re-exported)


# -- helpers ---------------------------------------------------------------------------------------
def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cosine_lr(step: int, total: int, warmup: int, base: float, final_frac: float = 0.0) -> float:
    """Linear warmup then cosine decay from ``base`` to ``base * final_frac``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def random_affine(x: torch.Tensor, gen: torch.Generator, *, shift: float, rotate: float, scale: float) -> torch.Tensor:
    """Per-image random translation (pixels), rotation (degrees) and isotropic scale, zero padding."""
    b, _, h, w = x.shape
    u = lambda: torch.rand(b, generator=gen) * 2 - 1  # noqa: E731  U(-1, 1)
    ang = u() * math.radians(rotate)
    s = 1 + u() * scale
    tx, ty = u() * shift * 2 / w, u() * shift * 2 / h  # affine_grid works in [-1, 1] coordinates
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


def split_info() -> dict:
    xtr, _ = D.load_digits("train")
    xte, _ = D.load_digits("test")
    return dict(dataset="sklearn.datasets.load_digits (8x8, values 0..16) /16, bilinear upsampled to 16x16",
                split="sklearn.model_selection.train_test_split(test_size=0.2, random_state=0, stratify=y)",
                random_state=D.SPLIT_RANDOM_STATE, test_size=D.SPLIT_TEST_SIZE,
                n_train=len(xtr), n_test=len(xte), trained_on="train", evaluated_on="test")


# -- classifiers -----------------------------------------------------------------------------------
def train_classifier(name: str, model: nn.Module, *, epochs: int, batch: int, lr: float, weight_decay: float,
                     warmup_epochs: int, label_smoothing: float, aug: dict, seed: int, out: Path,
                     filename: str, feature_layer: str) -> dict:
    from safetensors.torch import save_file

    xtr, ytr = D.load_digits("train")
    xte, yte = D.load_digits("test")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(xtr) / batch)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    print(f"[{name}] {n_params(model):,} params, {epochs} epochs x {steps_per_epoch} steps, batch {batch}, lr {lr}",
          flush=True)
    t0, step = time.time(), 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        tot_loss = 0.0
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            xb, yb = xtr[idx], ytr[idx]
            if aug:
                xb = random_affine(xb, gen, **aug)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, warmup, lr)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += loss.item() * len(idx)
            step += 1
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs - 1:
            print(f"[{name}] epoch {epoch + 1}/{epochs} loss {tot_loss / len(xtr):.4f} "
                  f"test acc {accuracy(model, xte, yte):.4f} ({time.time() - t0:.0f}s)", flush=True)
    wall = time.time() - t0
    model.eval()
    test_acc, train_acc = accuracy(model, xte, yte), accuracy(model, xtr, ytr)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / filename))
    entry = dict(file=filename, architecture=type(model).__name__, feature_layer=feature_layer,
                 params=n_params(model), seed=seed, data=split_info(), epochs=epochs, steps=total, batch_size=batch,
                 optimizer="AdamW", lr=lr, weight_decay=weight_decay, lr_schedule=f"linear warmup {warmup} steps, cosine to 0",
                 label_smoothing=label_smoothing, augmentation=aug or None, wall_seconds=round(wall, 1),
                 test_accuracy=round(test_acc, 6), train_accuracy=round(train_acc, 6),
                 model_selection="none (final epoch; the test split is never used for choices)", **env_info())
    update_meta(out, name, entry)
    print(f"[{name}] done in {wall:.0f}s: test acc {test_acc:.4f}, train acc {train_acc:.4f} -> {out / filename}",
          flush=True)
    return entry


def train_cnn(args) -> dict:
    torch.manual_seed(args.seed)
    model = D.DigitsCNN()
    return train_classifier("digits-cnn", model, epochs=args.cnn_epochs, batch=64, lr=args.cnn_lr,
                            weight_decay=1e-4, warmup_epochs=1, label_smoothing=0.0,
                            aug=dict(shift=1.0, rotate=8.0, scale=0.08), seed=args.seed, out=args.out,
                            filename=D.CNN_FILE, feature_layer=D.CNN_FEATURE_LAYER)


def train_vit(args) -> dict:
    torch.manual_seed(args.seed)
    model = D.build_digits_vit()
    entry = train_classifier("digits-vit", model, epochs=args.vit_epochs, batch=64, lr=args.vit_lr,
                             weight_decay=0.05, warmup_epochs=10, label_smoothing=0.1,
                             aug=dict(shift=1.5, rotate=10.0, scale=0.1), seed=args.seed, out=args.out,
                             filename=D.VIT_FILE, feature_layer=D.VIT_FEATURE_LAYER)
    entry["config"] = dict(timm_model="vit_tiny_patch16_224", pretrained=False, **D.VIT_CONFIG)
    update_meta(args.out, "digits-vit", entry)
    return entry


# -- diffusion prior -------------------------------------------------------------------------------
@torch.no_grad()
def eps_mse(unet, sched, x0: torch.Tensor, gen: torch.Generator, timesteps=(50, 250, 500, 750, 950)) -> dict:
    """Mean ||eps_pred - eps||^2 per pixel on images ``x0`` in [-1, 1] at fixed timesteps."""
    unet.eval()
    res = {}
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=gen)
        tt = torch.full((len(x0),), t, dtype=torch.long)
        xt = sched.add_noise(x0, noise, tt)
        res[str(t)] = round(float(F.mse_loss(unet(xt, tt).sample, noise)), 5)
    return res


def train_prior(args) -> dict:
    from diffusers import DDPMPipeline

    torch.manual_seed(args.seed)
    unet, sched = D.build_digits_unet(), D.build_digits_scheduler()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    xtr = D.load_digits("train")[0] * 2 - 1  # [-1, 1]
    xte = D.load_digits("test")[0] * 2 - 1
    gen = torch.Generator().manual_seed(args.seed)
    acp = sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=args.prior_lr, weight_decay=0.0)
    steps, batch, warmup = args.prior_steps, args.prior_batch, min(args.prior_warmup, args.prior_steps // 10)
    print(f"[digits-ddpm] {n_params(unet):,} params, {steps} steps, batch {batch}, lr {args.prior_lr}, "
          f"EMA {args.ema_decay}", flush=True)
    t0, perm, pos, run_loss = time.time(), torch.randperm(len(xtr), generator=gen), 0, None
    step_times = []
    for step in range(steps):
        ts = time.time()
        unet.train()
        if pos + batch > len(perm):  # epoch boundary: reshuffle (each batch is full)
            perm, pos = torch.randperm(len(xtr), generator=gen), 0
        x0 = xtr[perm[pos:pos + batch]]
        pos += batch
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, warmup, args.prior_lr, final_frac=0.05)
        loss = F.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        li = loss.item()
        step_times.append(time.time() - ts)
        run_loss = li if run_loss is None else 0.98 * run_loss + 0.02 * li
        if step % 100 == 0 or step == steps - 1:
            el = time.time() - t0
            print(f"[digits-ddpm] step {step + 1}/{steps} loss {run_loss:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)", flush=True)
    wall = time.time() - t0
    for b_ema, b in zip(ema.buffers(), unet.buffers()):  # (no buffers in UNet2DModel, kept for safety)
        b_ema.copy_(b)
    folder = args.out / D.DDPM_DIR
    DDPMPipeline(unet=ema, scheduler=sched).save_pretrained(folder, safe_serialization=True)
    gen_eval = torch.Generator().manual_seed(1234)
    test_mse = eps_mse(ema, sched, xte, gen_eval)
    print(f"[digits-ddpm] done in {wall:.0f}s; EMA eps-MSE on test by timestep: {test_mse} -> {folder}", flush=True)
    entry = dict(folder=D.DDPM_DIR, architecture="diffusers UNet2DModel", config=_jsonable(D.DDPM_UNET_CONFIG),
                 scheduler=_jsonable(D.DDPM_SCHEDULER_CONFIG), data_range="[-1, 1] (x * 2 - 1)",
                 params=n_params(unet), seed=args.seed, data=split_info(), steps=steps, batch_size=batch,
                 epochs=round(steps * batch / len(xtr), 1), optimizer="AdamW (weight_decay 0), grad-norm clip 1.0",
                 lr=args.prior_lr, lr_schedule=f"linear warmup {warmup} steps, cosine to 5%",
                 ema_decay=args.ema_decay, weights="EMA", loss="MSE(eps_pred, eps), t ~ U{0..999}",
                 wall_seconds=round(wall, 1), median_step_seconds=round(sorted(step_times)[len(step_times) // 2], 3),
                 test_eps_mse_by_timestep=test_mse, **env_info())
    update_meta(args.out, "digits-ddpm", entry)
    return entry


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# -- CLI -------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m featinv.zoo.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--what", default="prior,cnn,vit",
                   help="comma list of: prior, cnn, vit; shapes (all shapes-world stages) or shapes-<stage>")
    p.add_argument("--out", type=Path, default=D.WEIGHTS_DIR, help="output folder (weights + meta.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--cnn-epochs", type=int, default=30)
    p.add_argument("--cnn-lr", type=float, default=2e-3)
    p.add_argument("--vit-epochs", type=int, default=150)
    p.add_argument("--vit-lr", type=float, default=1e-3)
    p.add_argument("--prior-steps", type=int, default=3000)
    p.add_argument("--prior-batch", type=int, default=128)
    p.add_argument("--prior-lr", type=float, default=1e-3)
    p.add_argument("--prior-warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--shapes-scale", type=float, default=1.0, help="shapes world: multiply steps and data sizes")
    p.add_argument("--shapes-vae-start-phase", type=int, default=1, help="shapes world: resume the VAE at this phase")
    p.add_argument("--device", default="cpu",
                   help="shapes world: where the UNet stages train (e.g. cuda); every other stage runs on the CPU")
    args = p.parse_args(argv)
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    args.shapes = [w for w in args.what if w == "shapes" or w.startswith("shapes-")]
    bad = set(args.what) - {"prior", "cnn", "vit"} - set(args.shapes)
    if bad:
        p.error(f"--what: unknown {sorted(bad)}; choose from prior, cnn, vit, shapes, shapes-<stage>")
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r}: not a device; use cpu, cuda or cuda:N")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: only cpu and cuda are supported")
    from featinv.zoo.shapes.train import UNET_STAGES, expand

    stages = []
    if args.shapes:
        try:
            stages = expand(args.shapes)
        except ValueError as e:
            p.error(str(e))
    if dev.type != "cpu" and not (args.shapes and set(stages) & set(UNET_STAGES)):
        p.error(f"--device {args.device}: only the shapes UNet stages ({', '.join(UNET_STAGES)}) "
                "train there; none is selected")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        p.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    results, t0 = {}, time.time()
    for what, fn in (("cnn", train_cnn), ("vit", train_vit), ("prior", train_prior)):  # cheap ones first
        if what in args.what:
            results[what] = fn(args)
    if args.shapes:
        from featinv.zoo.shapes import train as shapes_train

        results["shapes"] = shapes_train.run(args.shapes, args.out, seed=args.seed, scale=args.shapes_scale,
                                             vae_start_phase=args.shapes_vae_start_phase, device=args.device)
    print(f"all done in {time.time() - t0:.0f}s -> {args.out}", flush=True)
    return results


if __name__ == "__main__":
    main()
