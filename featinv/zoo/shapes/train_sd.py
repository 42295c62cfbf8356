"""Training of the shapes world's diffusion models: the VAE (both latent priors use it), then UNet + text encoder.

VAE: ``AutoencoderKL`` on train renders of both modes (75 % single, 25 % multi), loss: per-pixel
MSE + L1 on [-1, 1], weighted 1 + ``object_weight`` on (3x3-dilated) object pixels (objects cover a few
% of the image; the renderer's masks say where; the last phase also boosts small objects), plus
``kl_weight`` * KL (summed over latent elements). Trained in warm-restart phases (``train_vae``): after
two phases the reader still read 6 % of small stars in reconstructions as squares (their concave points
partly filled), hence a third phase with the small-object boost (configured, never run); instead
``finetune_vae_decoder`` trains only shapes-sd's decoder with that boost (stage ``shapes-vae-dec``), which keeps
every latent the UNets learnt.
SD's 1e-6 KL weight multiplies a reconstruction loss *summed* over 3x32x32 pixels; ours is a pixel mean,
so the equivalent weight is ~3e-10 (a weight of 1e-5 kept the posterior std at 0.44 x the latent scale
and blurred every object: reader accuracy on reconstructions 0.46 for shape). Afterwards ``scaling_factor`` = 1 / std of the posterior means of
2,048 random train images (SD's convention), and both SD folders get this ``vae/``.

UNet + text encoder (one pair per SD folder): the scheduler's target (epsilon, or v with zero terminal SNR
for ``shapes-sd``; the stage config says which) on z = scaling_factor * (mu + sigma n) of the frozen VAE's
posterior (precomputed for the train split), t ~ U{0..999}, Min-SNR-5 weighting (Hang et al. 2023) or the
target's plain MSE (``loss_weights``), AdamW + warmup/cosine to 5 %, grad-norm clip 1, EMA of both networks
(the EMA weights are saved). Captions: 10 % "" (the unconditional prior; CFG), single mode also 15 %
partial captions (each captioned factor kept with p = 0.5; "a red shape at the top left").
"""
from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from featinv.priors import _eps_from_output
from featinv.zoo.shapes import sd as S
from featinv.zoo.shapes import text as T
from featinv.zoo.shapes import world as W
from featinv.zoo.shapes.fit import cosine_lr


def _n(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _ema_update(ema, model, decay):
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)



def _batches(n: int, batch: int, gen: torch.Generator):
    """Index batches of ``range(n)``, a fresh ``gen``-seeded shuffle whenever fewer than ``batch`` are left (the
    shuffles are drawn when the batch that needs them is asked for; n < batch: every batch is a whole shuffle)."""
    perm, pos = torch.randperm(n, generator=gen), 0
    while True:
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos:pos + batch]
        pos += batch


def _lr(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warmup, then cosine decay to 5 % of ``lr``."""
    return cosine_lr(step, steps, warmup, lr) * 0.95 + lr * 0.05 * (step >= warmup)


def _update(opt, loss: torch.Tensor, params) -> float:
    """One AdamW step with grad-norm clip 1; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


def _running(run: float | None, value: float) -> float:
    """Exponential running mean of the loss (0.98) for the progress lines."""
    return value if run is None else 0.98 * run + 0.02 * value


def _eta(t0: float, step: int, steps: int) -> str:
    el = time.time() - t0
    return f"({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)"


def _recon_loss(rec: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstruction loss: (squared + absolute) error per pixel, weighted by ``w`` (B, 1, H, W)."""
    err = (rec - x).pow(2) + (rec - x).abs()
    return (w * err).sum() / (w.sum() * 3)

# -- VAE -------------------------------------------------------------------------------------------
def vae_training_data(n_single: int, n_multi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The VAE's train renders in [-1, 1] (single then multi), their dilated object masks (N, 1, 32, 32) and the
    small-object boost clamp(64 px / object area, 1, 4) (N, 1, 1, 1): pixel weight 1 + w * mask (* boost)."""
    xs, rs = W.load_split("single", "train", n_single)
    xm, rm = W.load_split("multi", "train", n_multi)
    obj = torch.cat([W.masks(rs)["object"], W.masks(rm)["object"]])[:, None]
    boost = (64.0 / obj.sum((1, 2, 3), keepdim=True).clamp(min=1.0)).clamp(1.0, 4.0)
    return torch.cat([xs, xm]) * 2 - 1, F.max_pool2d(obj, 3, 1, 1), boost


def train_vae(out: Path, *, seed: int, phases: list, batch: int, kl_weight: float, n_single: int, n_multi: int,
              start_phase: int = 1, log=print) -> tuple[object, dict]:
    """Train in ``phases`` [(steps, lr, object_weight, small_boost), ...] (warm restarts: a fresh AdamW and
    warmup + cosine per phase, data order seeded with ``seed + phase - 1``); each phase ends by storing the
    VAE (float16) in both SD folders and the next phase starts from the stored weights, so ``start_phase``
    > 1 resumes exactly. Pixel weights: 1 + object_weight * dilated object mask, times
    clamp(64 px / object area, 1, 4) if ``small_boost`` (small objects count as much as large ones)."""
    from diffusers import AutoencoderKL

    x, dil, boost = vae_training_data(n_single, n_multi)
    stored = S.sd_dir("shapes-multi-sd", out) / "vae"  # shapes-vae-dec later replaces shapes-sd's decoder, never this
    infos = []
    for k, (steps, lr, object_weight, small_boost) in enumerate(phases, 1):
        if k < start_phase:
            continue
        weight = 1 + object_weight * dil * (boost if small_boost else 1.0)
        if k == 1:
            torch.manual_seed(seed)
            vae = S.build_vae()
        else:
            vae = AutoencoderKL.from_pretrained(str(stored), local_files_only=True)
        gen = torch.Generator().manual_seed(seed + k - 1)
        opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
        warmup = min(100, steps // 10)
        batches, run, times, t0 = _batches(len(x), batch, gen), None, [], time.time()
        c0, load0 = time.process_time(), os.getloadavg()[0]
        log(f"[shapes-vae] phase {k}: {_n(vae):,} params, {steps} steps, batch {batch}, lr {lr}, kl {kl_weight}")
        for step in range(steps):
            ts = time.time()
            idx = next(batches)
            xb, wb = x[idx], weight[idx]
            for g in opt.param_groups:
                g["lr"] = _lr(step, steps, warmup, lr)
            vae.train()
            post = vae.encode(xb).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample
            loss = _recon_loss(rec, xb, wb) + kl_weight * post.kl().mean()
            run = _running(run, _update(opt, loss, vae.parameters()))
            times.append(time.time() - ts)
            if step % 100 == 0 or step == steps - 1:
                log(f"[shapes-vae] phase {k} step {step + 1}/{steps} loss {run:.4f} {_eta(t0, step, steps)}")
        wall, cpu = time.time() - t0, time.process_time() - c0
        vae.eval()
        with torch.no_grad():
            sub = x[torch.randperm(len(x), generator=gen)[:2048]]
            mu = torch.cat([vae.encode(sub[i:i + 512]).latent_dist.mean for i in range(0, len(sub), 512)])
        scale = float(1.0 / mu.std())
        vae.register_to_config(scaling_factor=scale)
        for name in S.SD_NAMES:
            S.half_copy(vae).save_pretrained(str(S.sd_dir(name, out) / "vae"), safe_serialization=True)
        infos.append(dict(phase=k, steps=steps, lr=lr, object_weight=object_weight, small_object_boost=small_boost,
                          lr_schedule=f"linear warmup {warmup}, cosine to 5%",
                          data_order_seed=seed + k - 1, wall_seconds=round(wall, 1),
                          median_step_seconds=round(float(np.median(times)), 3), cpu_seconds_per_step=round(cpu / steps, 4),
                          load_average_1min=dict(start=round(load0, 2), end=round(os.getloadavg()[0], 2)),
                          final_loss=round(run, 5), scaling_factor=round(scale, 5)))
    vae = AutoencoderKL.from_pretrained(str(stored), local_files_only=True).eval()  # evaluate what is stored
    info = dict(architecture="diffusers AutoencoderKL", config=_jsonable(S.VAE_CONFIG), params=_n(vae), seed=seed,
                steps=sum(p[0] for p in phases), batch_size=batch, kl_weight=kl_weight,
                loss="object-weighted (MSE + L1) on [-1, 1] + kl_weight * KL (weights per phase)", optimizer="AdamW (wd 0), grad-norm clip 1",
                data=dict(single_train=n_single, multi_train=n_multi), scaling_factor=vae.config.scaling_factor,
                weights="float16 safetensors (loaded as float32)", phases=infos)
    return vae, info


def finetune_vae_decoder(vae, *, steps: int, lr: float, object_weight: float, batch: int, seed: int,
                         n_single: int, n_multi: int, log=print) -> dict:
    """Train only ``vae``'s decoder and ``post_quant_conv`` in place, with the VAE's own object-weighted loss
    and the small-object boost (pixel weight 1 + ``object_weight`` * dilated mask * boost) on the VAE's train
    renders; encoder, ``quant_conv`` and scaling factor stay as they are (checked), so every latent a UNet
    was trained on keeps its meaning. Warmup + cosine to 5 %, AdamW, grad-norm clip 1, data order and
    posterior draws seeded with ``seed``. Returns the training record."""
    x, dil, boost = vae_training_data(n_single, n_multi)
    weight = 1 + object_weight * dil * boost
    frozen = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    before, scale = [p.detach().clone() for p in frozen], vae.config.scaling_factor
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    warmup = min(100, steps // 10)
    batches, run, times, t0 = _batches(len(x), batch, gen), None, [], time.time()
    c0, load0 = time.process_time(), os.getloadavg()[0]
    log(f"[shapes-vae-dec] {_n(vae.decoder) + _n(vae.post_quant_conv):,} trained params, {steps} steps, "
        f"batch {batch}, lr {lr}, object weight {object_weight}")
    for step in range(steps):
        ts = time.time()
        idx = next(batches)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, warmup, lr)
        vae.decoder.train()
        with torch.no_grad():
            z = vae.encode(x[idx]).latent_dist.sample(generator=gen)
        run = _running(run, _update(opt, _recon_loss(vae.decode(z).sample, x[idx], weight[idx]), params))
        times.append(time.time() - ts)
        if step % 200 == 0 or step == steps - 1:
            log(f"[shapes-vae-dec] step {step + 1}/{steps} loss {run:.4f} {_eta(t0, step, steps)}")
    vae.eval().requires_grad_(False)
    if not all(torch.equal(a, b) for a, b in zip(before, frozen)) or vae.config.scaling_factor != scale:
        raise RuntimeError("the decoder fine-tune changed the encoder: the UNets' latents would lose their meaning")
    return dict(steps=steps, lr=lr, object_weight=object_weight, small_object_boost=True, batch_size=batch,
                data=dict(single_train=n_single, multi_train=n_multi), data_order_seed=seed,
                lr_schedule=f"linear warmup {warmup}, cosine to 5%", trained="decoder + post_quant_conv",
                loss="object-weighted (MSE + L1) on [-1, 1], small-object boost",
                optimizer="AdamW (wd 0), grad-norm clip 1", wall_seconds=round(time.time() - t0, 1),
                median_step_seconds=round(float(np.median(times)), 3),
                cpu_seconds_per_step=round((time.process_time() - c0) / steps, 4),
                load_average_1min=dict(start=round(load0, 2), end=round(os.getloadavg()[0], 2)),
                final_loss=round(run, 5))


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """VAE reconstructions (posterior mean) of images in [0, 1]."""
    outs = []
    for i in range(0, len(x), batch):
        z = vae.encode(x[i:i + batch] * 2 - 1).latent_dist.mean
        outs.append((vae.decode(z).sample / 2 + 0.5).clamp(0, 1))
    return torch.cat(outs)


# -- UNet + text encoder ---------------------------------------------------------------------------
def _captions(rows: np.ndarray, gen: np.random.Generator, p_empty: float, p_partial: float) -> list[str]:
    out = []
    for r in rows:
        u = gen.random()
        if u < p_empty:
            out.append("")
        elif u < p_empty + p_partial and r.dtype == W.SINGLE_DTYPE:
            keep = [f for f in W.FACTORS if gen.random() < 0.5]
            out.append(W.caption(r, keep))
        else:
            out.append(W.caption(r))
    return out


def train_unet(name: str, mode: str, out: Path, *, seed: int, steps: int, batch: int, lr: float, n_train: int,
               ema_decay: float, p_empty: float = 0.1, p_partial: float = 0.15, snr_gamma: float | None = 5.0,
               unet_over: dict | None = None, init_from: Path | None = None, object_weight: float = 0.0,
               scheduler: dict | None = None, device: str = "cpu", log=print) -> tuple[Path, dict]:
    """Train (or, with ``init_from`` an SD folder, continue training) the UNet and text encoder of a shapes
    SD folder on the VAE's latents. ``object_weight`` > 0 weights the loss on the latent cells the objects
    cover by 1 + object_weight (the renderer's masks pooled to the latent grid): the object is a few of the
    64 cells, so an unweighted loss is dominated by the background and learns shape and position last.
    ``scheduler``: overrides of ``sd.SCHEDULER_CONFIG`` for a new UNet (a continued one keeps its stored
    scheduler); its ``prediction_type`` is the UNet's target: ``"epsilon"`` (SD 1.x) or ``"v_prediction"``
    (SD 2.x; Salimans & Ho 2022, v = sqrt(a) eps - sqrt(1-a) z0). ``snr_gamma`` weights either by Min-SNR-gamma
    (Hang et al. 2023); ``None`` leaves the plain MSE of the target. As a weight on the x0 error these are:
    epsilon snr, v snr + 1, Min-SNR min(snr, gamma): at high noise epsilon and Min-SNR hardly weight x0 at
    all, and that is where the layout -- where the object goes -- is decided.
    Every 250 steps the log shows how much the (EMA) UNet's noise prediction changes when one factor's
    words change (``conditioning_probe``). ``device``: where the VAE encodes and the UNet and text encoder
    train (e.g. ``"cuda"``); every random draw stays on the CPU, so the data order, noise and timesteps are
    the same on any device. ``name`` ``shapes-pixel`` trains the pixel-space prior instead (the issue's fallback):
    no VAE, z0 = the render in [-1, 1], UNet ``sd.PIXEL_UNET_CONFIG``, saved by ``sd.save_pixel``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder, pixel = S.sd_dir(name, out), name == S.PIXEL_NAME
    if init_from is not None and scheduler:
        raise ValueError("a continued UNet keeps its stored scheduler; do not pass scheduler overrides")
    if init_from is not None and not (Path(init_from) / "unet").is_dir():
        raise FileNotFoundError(f"{Path(init_from) / 'unet'} is missing: a continuation starts from a whole SD folder; "
                                f"copy one there first (cp -r featinv/zoo/weights {out})")
    if not pixel and not (folder / "vae").is_dir():
        raise FileNotFoundError(f"{folder / 'vae'} is missing: the UNet trains on that VAE's latents; run the "
                                f"shapes-vae stage into {out} first or copy featinv/zoo/weights/{name}/vae there")
    device = torch.device(device)
    vae = None
    if not pixel:
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True).eval().requires_grad_(False)
        vae.to(device)
    # a continued UNet keeps the tokenizer its text encoder was trained with (older folders' ids differ)
    tok = T.build_tokenizer() if init_from is None else CLIPTokenizer.from_pretrained(str(Path(init_from) / "tokenizer"))
    if init_from is not None:
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_pretrained(str(Path(init_from) / "scheduler"), local_files_only=True)
    else:
        sched = S.build_scheduler(**(scheduler or {}))
    prediction = sched.config.prediction_type
    if prediction == "epsilon" and float(sched.alphas_cumprod[-1]) == 0:
        raise ValueError("a zero-terminal-SNR schedule needs v_prediction (epsilon is undefined at a = 0)")
    x, rows = W.load_split(mode, "train", n_train)
    if pixel:
        mu, std, scale = x * 2 - 1, None, 1.0
    else:
        with torch.no_grad():
            post = [vae.encode((x[i:i + 512] * 2 - 1).to(device)).latent_dist for i in range(0, len(x), 512)]
        mu, std = torch.cat([p.mean.cpu() for p in post]), torch.cat([p.std.cpu() for p in post])
        scale = vae.config.scaling_factor
        del post
    down = x.shape[-1] // mu.shape[-1]
    del x
    obj = F.avg_pool2d(W.masks(rows)["object"][:, None], down) if object_weight > 0 else None
    torch.manual_seed(seed)
    if init_from is not None:
        init_from = Path(init_from)
        unet = UNet2DConditionModel.from_pretrained(str(init_from / "unet"), local_files_only=True).float()
        text = CLIPTextModel.from_pretrained(str(init_from / "text_encoder"), local_files_only=True).float()
    else:
        unet_over = {**(S.PIXEL_UNET_CONFIG if pixel else {}), **(unet_over or {})}
        text, unet = S.build_text_encoder(len(tok)), S.build_unet(**unet_over)
    text, unet = text.to(device), unet.to(device)
    ema_t, ema_u = (copy.deepcopy(m).eval().requires_grad_(False) for m in (text, unet))
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen, cap_rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    acp = sched.alphas_cumprod
    snr = acp / (1 - acp)
    warmup = min(200, steps // 10)
    log(f"[{name}] UNet {_n(unet):,} + text {_n(text):,} params, {steps} steps, batch {batch}, lr {lr}")
    batches, run, times, t0 = _batches(len(mu), batch, gen), None, [], time.time()
    c0 = time.process_time()
    for step in range(steps):
        ts = time.time()
        idx = next(batches)
        z0 = mu[idx] if pixel else scale * (mu[idx] + std[idx] * torch.randn(mu[idx].shape, generator=gen))
        caps = _captions(rows[idx.numpy()], cap_rng, p_empty, p_partial)
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z0),), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, warmup, lr)
        unet.train(), text.train()
        target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z0
        w = loss_weights(snr[t], prediction, snr_gamma)
        zt, target, w, ids = zt.to(device), target.to(device), w.to(device), ids.to(device)
        pred = unet(zt, t.to(device), encoder_hidden_states=text(ids)[0]).sample
        if obj is None:
            per = (pred - target).pow(2).mean(dim=(1, 2, 3))
        else:
            m = (1 + object_weight * obj[idx]).to(device)  # (B, 1, h, w), normalised so the loss keeps its scale
            per = (m * (pred - target).pow(2)).mean(dim=(1, 2, 3)) / m.mean(dim=(1, 2, 3))
        run = _running(run, _update(opt, (w * per).mean(), params))
        decay = ema_decay if init_from is not None else min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_u, unet, decay)
        _ema_update(ema_t, text, decay)
        times.append(time.time() - ts)
        if step % 100 == 0 or step == steps - 1:
            log(f"[{name}] step {step + 1}/{steps} loss {run:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{_eta(t0, step, steps)}")
        if mode == "single" and (step % 250 == 0 or step == steps - 1):
            log(f"[{name}] step {step + 1} conditioning probe (EMA): eps t=500 "
                f"{conditioning_probe(ema_u, ema_t, tok, sched=sched)}, x0 t=800 "
                f"{conditioning_probe(ema_u, ema_t, tok, t=800, sched=sched, space='x0')}")
    wall, cpu = time.time() - t0, time.process_time() - c0
    if pixel:
        S.save_pixel(folder, unet=ema_u.cpu(), text_encoder=ema_t.cpu(), tokenizer=tok, scheduler=sched)
    else:
        S.save_sd(folder, unet=ema_u.cpu(), vae=vae.cpu(), text_encoder=ema_t.cpu(), tokenizer=tok, scheduler=sched)
    pipe = S.load_pipeline(folder)  # evaluate what is stored (a PixelPipeline for the pixel prior)
    # 512 test latents; a --shapes-scale smoke run (n_train < 512) uses as many as it trains on
    test_mse = eps_mse(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, sched, mode, n=min(512, n_train))
    info = dict(architecture=f"diffusers UNet2DConditionModel ({'pixel space, 32x32x3' if pixel else 'latent'}) "
                             "+ transformers CLIPTextModel (trained jointly)",
                unet_config=_jsonable({**S.UNET_CONFIG, **(unet_over or {})}), text_config=dict(S.TEXT_CONFIG),
                scheduler={k: sched.config[k] for k in (*S.SCHEDULER_CONFIG, "rescale_betas_zero_snr",
                                                         "timestep_spacing", *(scheduler or {}))},
                unet_params=_n(unet), text_params=_n(text), vocab_size=len(tok),
                seed=seed, steps=steps, batch_size=batch, lr=lr, lr_schedule=f"linear warmup {warmup}, cosine to 5%",
                optimizer="AdamW (wd 0), grad-norm clip 1", ema_decay=ema_decay, weights="EMA (UNet and text encoder)",
                loss=(f"Min-SNR-{snr_gamma} weighted " if snr_gamma is not None else "")
                + f"MSE of the {prediction} target, t ~ U{{0..999}}"
                + (f", latent cells weighted 1 + {object_weight} x object coverage" if object_weight > 0 else ""),
                init_from=str(init_from.name) if init_from is not None else None,
                conditioning_probe=dict(eps_t500=conditioning_probe(ema_u, ema_t, tok, sched=sched),
                                        x0_t800=conditioning_probe(ema_u, ema_t, tok, t=800, sched=sched, space="x0"))
                if mode == "single" else None,
                captions=dict(p_empty=p_empty, p_partial=p_partial if mode == "single" else 0.0),
                data=dict(mode=mode, split="train", n=n_train, epochs=round(steps * batch / n_train, 2)),
                wall_seconds=round(wall, 1), median_step_seconds=round(float(np.median(times)), 3),
                cpu_seconds_per_step=round(cpu / steps, 4), final_loss=round(run, 5), test_eps_mse_by_timestep=test_mse)
    return folder, info


def loss_weights(snr: torch.Tensor, prediction: str, snr_gamma: float | None) -> torch.Tensor:
    """Per-sample weights of the target's MSE. Min-SNR-gamma (Hang et al. 2023) for either target: the x0-MSE
    weight min(snr, gamma) divided by the target's own (epsilon-MSE = snr x0-MSE, v-MSE = (snr + 1) x0-MSE);
    ``snr_gamma=None``: the target's plain MSE (weight 1)."""
    if snr_gamma is None:
        return torch.ones_like(snr)
    per_x0 = {"epsilon": snr, "v_prediction": snr + 1}[prediction]
    return snr.clamp(max=snr_gamma) / per_x0


PROBE_CAPTIONS = {
    "base": "a small red circle at the top left on a gray background",
    "position": "a small red circle at the bottom right on a gray background",
    "shape": "a small red square at the top left on a gray background",
    "color": "a small blue circle at the top left on a gray background",
    "size": "a large red circle at the top left on a gray background",
    "background": "a small red circle at the top left on a white background",
}


@torch.no_grad()
def conditioning_probe(unet, text, tok, t: int = 500, n: int = 16, sched=None, space: str = "eps") -> dict:
    """How much the noise prediction at timestep ``t`` depends on each factor's words: the relative
    change ||eps(z, c') - eps(z, c)|| / ||eps(z, c)|| when one factor of caption c is changed (fixed z).
    A factor the UNet ignores scores ~0 (the first shapes-sd: position 0.01, shape 0.03, colour 0.33).
    ``sched`` (its ``prediction_type`` and ``alphas_cumprod``) converts other UNet targets to eps;
    ``space="x0"`` measures the change of the clean estimate x0-hat instead (needs ``sched``), which at high
    noise -- where the layout is decided -- is what the sample follows: eps changes there are tiny by
    construction (x0-hat = (z - sqrt(1-a) eps) / sqrt(a))."""
    if space not in ("eps", "x0") or (space == "x0" and sched is None):
        raise ValueError(f"space must be 'eps' or 'x0' (with sched=...), got {space!r}, sched={sched}")
    z = torch.randn(n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                    generator=torch.Generator().manual_seed(0)).to(unet.device)
    tt = torch.full((n,), t, dtype=torch.long, device=unet.device)
    was = unet.training, text.training
    unet.eval(), text.eval()
    eps = {k: _eps(unet(z, tt, encoder_hidden_states=S.encode_captions(text, tok, [c] * n)).sample, z, tt, sched)
           for k, c in PROBE_CAPTIONS.items()}
    unet.train(was[0]), text.train(was[1])
    if space == "x0":
        a = sched.alphas_cumprod[t]
        eps = {k: (z - (1 - a).sqrt() * e) / a.sqrt() for k, e in eps.items()}
    base = eps.pop("base")
    return {k: round(float((e - base).norm() / base.norm()), 4) for k, e in eps.items()}


@torch.no_grad()
def eps_mse(unet, text, tok, vae, sched, mode: str, n: int = 512, timesteps=(50, 250, 500, 750, 950)) -> dict:
    """Mean ||eps_pred - eps||^2 (any prediction type, converted) on test latents (``vae=None``: pixels in [-1, 1])
    with their full captions at fixed timesteps."""
    gen = torch.Generator().manual_seed(1234)
    x, rows = W.load_split(mode, "test", n)
    z0 = x * 2 - 1 if vae is None else vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    h = S.encode_captions(text, tok, W.captions(rows))
    res = {}
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=gen)
        tt = torch.full((n,), t, dtype=torch.long)
        zt = sched.add_noise(z0, noise, tt)
        res[str(t)] = round(float(F.mse_loss(_eps(unet(zt, tt, encoder_hidden_states=h).sample, zt, tt, sched),
                                             noise)), 5)
    return res


def _eps(out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, sched=None) -> torch.Tensor:
    if sched is None:
        return out
    return _eps_from_output(out, z, t, sched.alphas_cumprod, sched.config.prediction_type)


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def unit_seconds(fn, n: int = 5) -> float:
    """Median seconds of ``fn()`` over ``n`` calls after one warm-up call (for quick timing)."""
    fn()
    ts = []
    for _ in range(n):
        t = time.time()
        fn()
        ts.append(time.time() - t)
    return float(np.median(ts)) if ts else math.nan
