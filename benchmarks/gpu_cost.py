"""Cost of guided sampling with full-size Stable Diffusion 1.x (random weights) on a GPU.

Weights are random because none can be downloaded here: timings and memory depend on the
architecture, not on the weights (cosine figures would not, so none are reported).

    python benchmarks/gpu_cost.py --out benchmarks/results/gpu_cost      # on a GPU machine
    python benchmarks/gpu_cost.py --tiny                                   # CPU smoke run

For each encoder (torchvision ResNet-50 penultimate, ViT-H/14 CLS at 518 px) and batch size, it
times one guided evaluation of the step function (UNet forward, Tweedie, VAE decode, encoder,
backward through all of them, scheduler step) and one unguided evaluation, with peak GPU memory.
Both presets run the same step function; they differ in the number of evaluations, so
seconds per image = NFE x seconds per evaluation / batch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import commit  # noqa: E402

from featinv.api import run_method  # noqa: E402
from featinv.encoders import build_encoder  # noqa: E402
from featinv.methods import get_method  # noqa: E402
from featinv.priors import LatentPrior  # noqa: E402

SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
               block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, sample_size=512, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)
SD_SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, steps_offset=1)
TINY_UNET = dict(SD_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=8)
TINY_VAE = dict(SD_VAE, sample_size=64, block_out_channels=(8, 16, 16, 16), norm_num_groups=8)


def sd_prior(tiny: bool, dtype: torch.dtype, device: str) -> LatentPrior:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD_UNET))
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE))
    cond = torch.randn(1, 77, unet.config.cross_attention_dim)  # stands in for CLIP("") of SD's text encoder
    prior = LatentPrior(unet.to(dtype), vae.to(dtype), DDPMScheduler(**SD_SCHED), cond.to(dtype))
    return prior.to(device)


ENCODERS = {  # random-init torchvision models through featinv's real builders
    "resnet50": ("torchvision:resnet50@avgpool", {}),
    "vit_h_14": ("torchvision:vit_h_14@encoder.ln", {"model_kwargs": {"image_size": 518}, "pool": "cls"}),
}
TINY_ENCODERS = {"resnet18": ("torchvision:resnet18@avgpool", {})}


def time_evals(prior, encoder, batch: int, guided: bool, device: str, evals: int = 10,
               warmup: int = 3, preset: str = "fast") -> tuple[float, float]:
    """Median seconds per evaluation (after ``warmup`` evaluations) and peak memory in GiB.

    Guidance runs at constant weight (every evaluation takes its gradient); unguided = all weights 0."""
    off = dict(weight=0.0, z_weight=0.0, x0_weight=0.0, clamp_k=None)
    method = get_method(preset, steps=evals + warmup, recurrence=1, early_steps=0, schedule="constant",
                        **({} if guided else off))
    target = torch.randn(batch, encoder.dim, device=device)
    stamps = []

    def tick(_):
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    keys = [("bench", i) for i in range(batch)]
    if device == "cuda":
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
    run_method(method, prior, encoder, target, keys, callback=tick)
    dts = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]  # stamps[k] ends evaluation k
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return statistics.median(dts), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny random models on CPU (smoke test)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--encoders", default=None)
    ap.add_argument("--encoder-dtype", default="float32", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    dtype = getattr(torch, a.dtype) if device == "cuda" else torch.float32
    encs = TINY_ENCODERS if a.tiny else ENCODERS
    names = a.encoders.split(",") if a.encoders else list(encs)
    prior = sd_prior(a.tiny, dtype, device)
    rows = []
    for name in names:
        spec, kw = encs[name]
        encoder = build_encoder(spec, **kw).to(device)
        if device == "cuda":
            encoder.model.to(getattr(torch, a.encoder_dtype))
        for b in map(int, a.batches.split(",")):
            g, g_mem = time_evals(prior, encoder, b, True, device)
            u, u_mem = time_evals(prior, encoder, b, False, device)
            row = dict(encoder=name, batch=b, dtype=str(dtype).replace("torch.", ""),
                       encoder_dtype=a.encoder_dtype if device == "cuda" else "float32", s_per_eval_guided=g,
                       s_per_eval_unguided=u, guided_over_unguided=g / u, peak_gib_guided=g_mem,
                       peak_gib_unguided=u_mem)
            for preset in ("shirahama2025", "fast"):
                nfe = get_method(preset).nfe()
                row[f"nfe_{preset}"] = nfe
                row[f"s_per_image_{preset}"] = nfe * g / b
            rows.append(row)
            print(json.dumps(row), flush=True)
        del encoder
        if device == "cuda":
            torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, tiny=a.tiny, command="python benchmarks/gpu_cost.py " + " ".join(
                    f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v not in (None, False)),
                commit=os.environ.get("FEATINV_COMMIT") or commit(), image_px=512 if not a.tiny else 64)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        json.dump({"meta": meta, "rows": rows}, open(a.out + ".json", "w"), indent=1)
        open(a.out + ".md", "w").write(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta, rows) -> str:
    head = ("| encoder | batch | dtype (prior / encoder) | s/eval guided | s/eval unguided | guided/unguided | peak GiB guided | "
            "peak GiB unguided | s/image shirahama2025 (NFE) | s/image fast (NFE) |\n|" + "---|" * 10 + "\n")
    body = "".join(
        f"| {r['encoder']} | {r['batch']} | {r['dtype']} / {r['encoder_dtype']} | {r['s_per_eval_guided']:.3f} | "
        f"{r['s_per_eval_unguided']:.3f} | {r['guided_over_unguided']:.2f} | {r['peak_gib_guided']:.1f} | "
        f"{r['peak_gib_unguided']:.1f} | {r['s_per_image_shirahama2025']:.0f} ({r['nfe_shirahama2025']}) | "
        f"{r['s_per_image_fast']:.1f} ({r['nfe_fast']}) |\n" for r in rows)
    return (f"# Cost of guidance, SD-1.x UNet + VAE at {meta['image_px']} px, random weights\n\n"
            f"Device: {meta['device']}; torch {meta['torch']}; commit {meta['commit']}.\n"
            f"Command: `{meta['command']}`. Median of 10 evaluations after 3 warm-ups; one evaluation = "
            "UNet + VAE decode + encoder (+ backward through all when guided) + scheduler step. s/image = "
            "NFE x s/eval / batch.\n\n" + head + body)



if __name__ == "__main__":
    main()
