"""One plain-PyTorch training loop for every small shapes-world classifier (readers, encoders, targets).

``fit`` trains a multi-head model (``nets.ReaderNet`` / ``nets.ShapesCNN``) on images in [0, 1] with
per-head labels: cross-entropy heads (int64 labels) or one multi-label BCE head (float (N, K) labels).
AdamW, linear warmup + cosine decay, optional augmentation ``aug(x, gen) -> x``; seeded by ``seed``
(initialisation is the caller's ``torch.manual_seed``; data order and augmentation use one generator).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from featinv.zoo.shapes.nets import split_logits


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1 + math.cos(math.pi * p))


def head_loss(logits: torch.Tensor, y: dict[str, torch.Tensor], heads: dict[str, int]) -> torch.Tensor:
    out = split_logits(logits, heads)
    loss = 0.0
    for name, lg in out.items():
        t = y[name]
        loss = loss + (F.binary_cross_entropy_with_logits(lg, t.float()) if t.is_floating_point() or t.dtype == torch.bool
                       else F.cross_entropy(lg, t))
    return loss


def fit(name: str, model: nn.Module, x: torch.Tensor, y: dict[str, torch.Tensor], *, steps: int, batch: int,
        lr: float, seed: int, weight_decay: float = 1e-4, warmup: int = 50, aug=None, log_every: int = 200,
        consistency: float = 0.0, consistency_rampup: float = 0.4) -> dict:
    """Train in place; returns {steps, batch, lr, wall_seconds, median_step_seconds, cpu_seconds_per_step,
    final_loss} (CPU seconds of this process, all threads: a cost measure other users' load barely changes).

    ``consistency`` > 0 (needs ``aug`` and ``model.embed``): each batch is augmented twice, the label loss
    is averaged over both views and ``consistency`` * ||f1 - f2||^2 / ||f1||^2 (penultimate features,
    denominator detached) is added: the feature itself, not only the decision, becomes invariant to the
    augmentation (Bachman et al. 2014; Laine & Aila 2017 use the same two-view consistency). As in Laine &
    Aila, its weight ramps up as exp(-5 (1 - s)^2) over the first ``consistency_rampup`` of training: at
    full weight from step 0 the feature collapses to a constant (measured: shapes-shape stayed at
    chance, loss ln 4)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    heads = model.heads
    perm, pos, times, run = torch.randperm(len(x), generator=gen), 0, [], None
    t0, c0 = time.time(), time.process_time()
    for step in range(steps):
        ts = time.time()
        if pos + batch > len(perm):
            perm, pos = torch.randperm(len(x), generator=gen), 0
        idx = perm[pos:pos + batch]
        pos += batch
        xb = x[idx]
        yb = {k: v[idx] for k, v in y.items()}
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, warmup, lr)
        model.train()
        if consistency > 0:
            f1, f2 = model.embed(aug(xb, gen)), model.embed(aug(xb, gen))
            loss = 0.5 * (head_loss(model.head(f1), yb, heads) + head_loss(model.head(f2), yb, heads))
            ramp = math.exp(-5 * (1 - min(1.0, step / max(1, consistency_rampup * steps))) ** 2)
            loss = loss + consistency * ramp * (f1 - f2).pow(2).sum(1).mean() / f1.pow(2).sum(1).mean().detach().clamp(min=1e-6)
        else:
            loss = head_loss(model(aug(xb, gen) if aug is not None else xb), yb, heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.time() - ts)
        run = loss.item() if run is None else 0.95 * run + 0.05 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            print(f"[{name}] step {step + 1}/{steps} loss {run:.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return dict(steps=steps, batch_size=batch, lr=lr, weight_decay=weight_decay, warmup_steps=warmup,
                optimizer="AdamW", lr_schedule="linear warmup, cosine to 0", wall_seconds=round(time.time() - t0, 1),
                median_step_seconds=round(sorted(times)[len(times) // 2], 4),
                cpu_seconds_per_step=round((time.process_time() - c0) / steps, 4), final_loss=round(run, 5))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> dict[str, torch.Tensor]:
    """{head: logits} over ``x`` in batches (eval mode)."""
    model.eval()
    outs = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    return split_logits(torch.cat(outs), model.heads)


def accuracies(model: nn.Module, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-head accuracy (argmax for CE heads, per-element logit > 0 for BCE heads)."""
    out = predict(model, x)
    res = {}
    for k, t in y.items():
        if t.dtype == torch.bool or t.is_floating_point():
            res[k] = round(float(((out[k] > 0) == t.bool()).float().mean()), 6)
        else:
            res[k] = round(float((out[k].argmax(1) == t).float().mean()), 6)
    return res


# -- augmentations --------------------------------------------------------------------------------
def add_noise(x: torch.Tensor, gen: torch.Generator, max_sigma: float = 0.04) -> torch.Tensor:
    """Gaussian pixel noise with a per-image sigma ~ U(0, max_sigma), clamped to [0, 1]."""
    s = torch.rand(len(x), 1, 1, 1, generator=gen) * max_sigma
    return (x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def blur(x: torch.Tensor, gen: torch.Generator, max_sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur with a per-image sigma ~ U(0, max_sigma) pixels (5-tap separable, replicate borders)."""
    b, c, h, w = x.shape
    sigma = (torch.rand(b, generator=gen) * max_sigma).clamp(min=1e-3)
    k = torch.exp(-torch.arange(-2.0, 3.0).pow(2)[None] / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b * c, 5)
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, k.view(b * c, 1, 5, 1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, 1, 5), groups=b * c)
    return y.view(b, c, h, w)


def blur_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The readers' augmentation: mild blur then pixel noise (robust judges of decoded images)."""
    return add_noise(blur(x, gen), gen)


def shift(x: torch.Tensor, gen: torch.Generator, max_px: float = 8.0) -> torch.Tensor:
    """Random translation by U(-max_px, max_px) pixels per axis; borders replicate the background."""
    b, _, h, w = x.shape
    t = (torch.rand(b, 2, generator=gen) * 2 - 1) * max_px * 2 / torch.tensor([w, h])
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def hue(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random RGB channel permutation per image (6 permutations): changes hue, keeps shapes."""
    perms = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    p = perms[torch.randint(0, 6, (len(x),), generator=gen)]
    return torch.gather(x, 1, p[:, :, None, None].expand(-1, -1, *x.shape[2:]))
