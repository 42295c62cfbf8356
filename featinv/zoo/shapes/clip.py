"""``shapes-clip``: a mini-CLIP (open_clip, custom tiny config) trained contrastively on shapes captions.

Saved in open_clip's ``local-dir`` format (``open_clip_config.json`` + ``open_clip_model.safetensors``
+ the shapes ``CLIPTokenizer`` files, used through open_clip's ``HFTokenizer``), so featinv's
``clip:`` family loads it unchanged: ``clip:local-dir:<folder>`` (``zoo:shapes-clip`` points there).
Text tower: open_clip ``TextTransformer``, EOS pooling (the shapes tokenizer's EOS is not its largest id).

Training: full captions (70 %) and partial captions (30 %, each factor kept with p = 0.5, e.g.
"a red shape"), so that short text targets such as "a red circle" are meaningful. The loss is CLIP's
symmetric cross-entropy with *multi-positive* targets: a caption is a positive for every image in the
batch whose factors it describes (uniform target over those), which removes false negatives.

Vision tower: open_clip's ``ModifiedResNet`` (CLIP's RN towers; ``VISION["resnet"]``), spatial layer ``layer1``.

``hard_negatives`` (NegCLIP, Yuksekgonul et al., ICLR 2023): each image also brings k copies of its full caption
with one factor (drawn uniformly) set to another value; they join the texts the images are contrasted with
(image -> text; each is a positive for the batch images it describes). ``negative_images``: the same swaps
rendered (same scene, one factor changed) join the images each own caption is contrasted with (text -> image).
Without them a batch of 128 random scenes is told apart by colour, size and background alone (72 combinations)
and the first mini-CLIP (a ViT tower, no hard negatives) learnt neither shape nor position (test zero-shot 0.28
and 0.24, chance 0.25 and 0.11); the committed one (3 of each, 6,000 steps) reads both at >= 0.996
(docs/design.md, "The mini-CLIP").

``noise_std`` (Gaussian input noise, per-image std from U(0, noise_std)) and ``init`` (fine-tune saved weights) serve
benchmarks/shapes_clip_robust.py: noise made the embedding easier to match but not its inversions more faithful, so
the committed model uses neither.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from featinv.zoo.shapes import text as T
from featinv.zoo.shapes import world as W

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
FOLDER = "shapes-clip"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# Vision towers (open_clip's own): CLIP's ModifiedResNet (a list of layers) or its ViT. The ViT below learnt no
# shape in 1,500 contrastive steps (zero-shot 0.28, chance 0.25; even trained on shape labels alone it reads 0.69
# of val shapes after 800 steps), the ResNet reads 0.90 after 500 supervised steps at half the step time.
VISION = {"resnet": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
          "vit": {"image_size": 32, "patch_size": 4, "width": 64, "layers": 4, "head_width": 32, "mlp_ratio": 2.0}}
SPATIAL_LAYER = {"resnet": "layer1 (first residual stage, 64 x 8 x 8)", "vit": "conv1 (patch embedding, 64 x 8 x 8)"}


def open_clip_config(vocab_size: int, vision: str = "resnet") -> dict:
    return {"model_cfg": {"embed_dim": 64,
                          "vision_cfg": dict(VISION[vision]),
                          "text_cfg": {"context_length": T.MAX_LENGTH, "vocab_size": vocab_size, "width": 64,
                                       "heads": 4, "layers": 2, "mlp_ratio": 4.0, "hf_tokenizer_name": "shapes-clip",
                                       "pool_type": "eos", "eos_id": 1, "pad_id": 1}},
            "preprocess_cfg": {"size": 32, "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear",
                               "resize_mode": "squash"}}


def clip_dir(root: str | Path | None = None) -> Path:
    return Path(root or WEIGHTS_DIR) / FOLDER


def write_folder(folder: Path, vision: str = "resnet") -> Path:
    """Config + tokenizer (no weights yet)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = T.build_tokenizer()
    tok.save_pretrained(str(folder))
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config(len(tok), vision), indent=2) + "\n")
    return folder


def create(folder: Path):
    """(model, tokenizer) through open_clip's ``local-dir:`` path (random init if no weights saved)."""
    import open_clip

    name = f"local-dir:{folder}"
    return open_clip.create_model(name), open_clip.get_tokenizer(name)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _batch_captions(rows: np.ndarray, rng: np.random.Generator, p_partial: float = 0.3):
    keep = np.ones((len(rows), len(W.FACTORS)), bool)
    part = rng.random(len(rows)) < p_partial
    keep[part] = rng.random((int(part.sum()), len(W.FACTORS))) < 0.5
    names = list(W.FACTORS)
    caps = [W.caption(r, [f for f, k in zip(names, kk) if k]) for r, kk in zip(rows, keep)]
    return caps, torch.from_numpy(keep)


def _hard_negatives(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(len(rows) * k) rows: each row k times, each copy with one factor (uniform) set to another value."""
    names = list(W.FACTORS)
    out = np.repeat(rows, k)
    for i, f in enumerate(rng.integers(0, len(names), len(out))):
        col, n_val = out[names[f]], len(W.FACTORS[names[f]])  # a field view: assignment is in place
        col[i] = (col[i] + rng.integers(1, n_val)) % n_val
    return out


def train_clip(out: Path, *, seed: int, n: int, steps: int, batch: int, lr: float, n_test: int,
               hard_negatives: int = 0, negative_images: bool = False, vision: str = "resnet",
               eval_split: str = "test", noise_std: float = 0.0, init: str | Path | None = None) -> dict:
    from safetensors.torch import save_file

    from featinv.zoo.shapes.fit import cosine_lr

    if vision not in VISION:
        raise ValueError(f"vision={vision!r} is not one of {sorted(VISION)}")
    if negative_images and not hard_negatives:
        raise ValueError("negative_images renders the hard negatives: set hard_negatives >= 1 with it")
    if not 0.0 <= noise_std < 1.0:
        raise ValueError(f"noise_std={noise_std} must be in [0, 1) (the std of pixel noise on [0, 1] images)")
    folder = clip_dir(out)
    if init is not None and Path(init).resolve() == folder.resolve():
        raise ValueError(f"init={init} is the folder this run rebuilds: give another --out")
    if folder.exists():
        shutil.rmtree(folder)
    write_folder(folder, vision)
    torch.manual_seed(seed)
    model, tok = create(folder)
    if init is not None:  # fine-tune a saved mini-CLIP (benchmarks/shapes_clip_robust.py) instead of a fresh one
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(init) / "open_clip_model.safetensors")))
    x, rows = W.load_split("single", "train", n)
    lab = torch.stack(list(W.labels(rows).values()), 1)  # (N, 5)
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup, t0, c0, times, run = min(100, steps // 10), time.time(), time.process_time(), [], None
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        ts = time.time()
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch]
        pos += batch
        caps, keep = _batch_captions(rows[idx.numpy()], rng)
        li, xi = lab[idx], x[idx]
        lt = li  # labels of the texts
        if hard_negatives:
            neg = _hard_negatives(rows[idx.numpy()], hard_negatives, rng)
            caps = caps + W.captions(neg)
            keep = torch.cat([keep, torch.ones(len(neg), keep.shape[1], dtype=torch.bool)])
            lt = torch.cat([li, torch.stack(list(W.labels(neg).values()), 1)])
            if negative_images:  # the same swaps rendered: images the own captions must not match
                li = lt
                xi = torch.cat([xi, W.render(neg)])
        pos_mask = ((li[:, None, :] == lt[None, :, :]) | ~keep[None, :, :]).all(-1).float()  # (img, txt)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, warmup, lr)
        if noise_std:  # Gaussian noise of a per-image std drawn from U(0, noise_std): smoother input gradients
            xi = xi + noise_std * torch.rand(len(xi), 1, 1, 1, generator=gen) * torch.randn(xi.shape, generator=gen)
        model.train()
        img = F.normalize(model.encode_image(_normalize(xi)), dim=-1)
        txt = F.normalize(model.encode_text(tok(caps)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        own = slice(0, len(idx))  # each direction over the batch's own images / captions (a negative may match none)
        loss = 0.5 * (F.cross_entropy(logits[own], pos_mask[own] / pos_mask[own].sum(1, keepdim=True))
                      + F.cross_entropy(logits[:, own].T, pos_mask[:, own].T / pos_mask[:, own].T.sum(1, keepdim=True)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.time() - ts)
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 200 == 0 or step == steps - 1:
            print(f"[shapes-clip] step {step + 1}/{steps} loss {run:.4f} ({time.time() - t0:.0f}s)", flush=True)
    wall, cpu = time.time() - t0, time.process_time() - c0
    model.eval()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    model, tok = create(folder)  # reload through the public path: what is evaluated is what is saved
    return dict(folder=FOLDER, architecture=f"open_clip CLIP ({'ModifiedResNet' if vision == 'resnet' else 'ViT'} vision tower, TextTransformer)",
                config=open_clip_config(len(T.build_tokenizer()), vision), spec=f"clip:local-dir:<weights>/{FOLDER}",
                params=sum(p.numel() for p in model.parameters()), seed=seed,
                data=dict(mode="single", split="train", n=n, p_partial_caption=0.3), steps=steps, batch_size=batch,
                lr=lr, optimizer="AdamW (wd 0.1)", lr_schedule=f"linear warmup {warmup}, cosine to 0",
                loss="symmetric multi-positive InfoNCE (positives: captions consistent with the image's factors)"
                + (f"; {hard_negatives} one-factor-swapped hard negative caption(s) per image (NegCLIP)"
                   + (", also rendered as negative images" if negative_images else "") if hard_negatives else ""),
                wall_seconds=round(wall, 1), median_step_seconds=round(float(np.median(times)), 4),
                cpu_seconds_per_step=round(cpu / steps, 4), final_loss=round(run, 5), default_layer="embedding (64-d image embedding)",
                spatial_layers=[SPATIAL_LAYER[vision]],
                **(dict(noise_std=noise_std) if noise_std else {}), **(dict(init=str(init)) if init else {}),
                **{f"{eval_split}_zero_shot_accuracy": zero_shot(model, tok, n_test, eval_split)})


@torch.no_grad()
def zero_shot(model, tok, n_test: int, split: str = "test") -> dict:
    """Per-factor zero-shot accuracy on ``split``'s renders with one-factor prompts ("a red shape", "a circle",
    "a shape at the top left"...) and top-1 accuracy of the full caption among all 2,592."""
    x, rows = W.load_split("single", split, n_test)
    img = F.normalize(model.encode_image(_normalize(x)), dim=-1)
    lab = W.labels(rows)
    res = {}
    base = T.all_single_rows()[:1]
    for f, values in W.FACTORS.items():
        prompts = [W.caption(W.edit(base, f, v)[0], [f]) for v in range(len(values))]
        txt = F.normalize(model.encode_text(tok(prompts)), dim=-1)
        res[f] = round(float(((img @ txt.T).argmax(1) == lab[f]).float().mean()), 6)
    allrows = T.all_single_rows()
    txt = F.normalize(torch.cat([model.encode_text(tok(W.captions(allrows[i:i + 512])))
                                 for i in range(0, len(allrows), 512)]), dim=-1)
    key = np.stack([allrows[f] for f in W.FACTORS], 1)
    pred = key[(img @ txt.T).argmax(1).numpy()]
    truth = np.stack([rows[f] for f in W.FACTORS], 1)
    res["full_caption_top1"] = round(float((pred == truth).all(1).mean()), 6)
    return res
