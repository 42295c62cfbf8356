"""DiffExplainer (Pennisi et al., arXiv 2404.02618): optimise a prompt's token embeddings (soft tokens) so
that a diffusion model conditioned on them generates images maximising a class output or a hidden unit.

Step (``diffexplainer``): soft tokens s (one per template slot, in the text encoder's token-embedding
space) -> the prior's text encoder (``featinv.explain.prompt.SlotTextEncoder.encode_embeddings``) ->
``batch`` images from fixed noise with the unrolled few-step sampler (``featinv.explain.unrolled``) ->
loss = the target's loss (``featinv.explain.score``: -logit_k by default, or -activation of a unit) ->
Adam on s. Images that hit the target are kept as frames. s is parametrised as m + sigma * delta
(m, sigma: mean and std of the candidate words' embeddings; delta starts at small noise), so ``lr`` is in
units of the embedding spread. The readable form of the result is each soft token's nearest word
(cosine); the activation score is computed for the soft conditioning itself and for that hard prompt.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from featinv.contract import make_generators, randn
from featinv.explain.prompt import SlotTextEncoder, Template
from featinv.explain.score import ClassTarget, activation_score
from featinv.explain.unrolled import unrolled_sample

__all__ = ["DiffExplainerConfig", "DiffExplainerResult", "diffexplainer", "run_diffexplainer"]


@dataclass
class DiffExplainerConfig:
    steps: int = 100
    lr: float = 0.05  # Adam, in units of the word embeddings' std
    init_noise: float = 0.1  # delta ~ N(0, init_noise^2) at the start
    sample_steps: int = 8
    cfg_scale: float = 1.0
    batch: int = 2
    checkpoint: bool = False
    score_samples: int = 100
    loss: str = "logit"  # class targets: "logit" (maximise logit_k) or "ce"
    seed: int = 0

    def __post_init__(self):
        for k in ("steps", "sample_steps", "batch", "score_samples"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DiffExplainer: {k}={v!r} must be an integer >= 1")
        if not self.lr > 0 or self.init_noise < 0 or self.cfg_scale < 0:
            raise ValueError("DiffExplainer: lr must be > 0, init_noise and cfg_scale >= 0")
        if self.loss not in ("logit", "ce"):
            raise ValueError(f"DiffExplainer: loss must be 'logit' or 'ce', got {self.loss!r}")


@dataclass
class DiffExplainerResult:
    soft: torch.Tensor  # (n_slots, D) optimised token embeddings
    cond: torch.Tensor  # (1, L, D) their conditioning
    words: list[str]  # nearest word of each soft token
    prompt: str  # the surface prompt of ``words``
    frames: torch.Tensor
    frame_steps: list[int]
    trace: list[dict]
    seconds: float
    nfe: int
    activation: dict = field(default_factory=dict)  # score of the soft conditioning
    activation_words: dict = field(default_factory=dict)  # score of the nearest-word prompt
    report: object = None


def diffexplainer(prior, target, template: Template, words: list[str], config: DiffExplainerConfig | None = None, *,
                  callback=None) -> DiffExplainerResult:
    """Optimise soft tokens for ``target`` (module docstring); ``words``: the candidate vocabulary that
    anchors the initialisation and the nearest-word readout."""
    cfg = config or DiffExplainerConfig()
    if prior.text_encoder is None:
        raise ValueError("DiffExplainer needs a text-conditioned prior (a text encoder and tokenizer)")
    dev = prior.device
    text = SlotTextEncoder(prior.text_encoder, prior.tokenizer, template, words, dtype=prior.dtype).to(dev)
    with torch.no_grad():
        W = (text.T @ text.token_embedding.to(text.T.dtype)).float()
        m, sigma = W.mean(0), W.std(0).mean()
    gen = torch.Generator().manual_seed(cfg.seed)
    delta = (torch.randn(template.n_slots, W.shape[1], generator=gen) * cfg.init_noise).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    noise = randn(make_generators(range(cfg.seed, cfg.seed + cfg.batch)), prior.latent_shape, device=dev)
    frames, frame_steps, trace, t0, nfe = [], [], [], time.time(), 0
    for step in range(cfg.steps):
        soft = m + sigma * delta
        cond = text.encode_embeddings(soft)
        imgs = unrolled_sample(prior, cond, noise, cfg.sample_steps, cfg_scale=cfg.cfg_scale, checkpoint=cfg.checkpoint)
        nfe += cfg.sample_steps * cfg.batch * (2 if cfg.cfg_scale != 1.0 else 1)
        sc = target(imgs)
        loss = sc.loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if delta.grad is not None and not torch.isfinite(delta.grad).all():
            delta.grad = torch.nan_to_num(delta.grad, nan=0.0, posinf=0.0, neginf=0.0)
        opt.step()
        hit = sc.hit.detach().cpu()
        for b in hit.nonzero().flatten().tolist():
            frames.append(imgs[b].detach().float().cpu())
            frame_steps.append(step)
        row = dict(step=step, words=" ".join(text.nearest_words(soft.detach())), loss=round(loss.item(), 5),
                   hit_rate=round(float(hit.float().mean()), 4), value=round(float(sc.value.detach().mean()), 5))
        trace.append(row)
        if callback is not None:
            callback(row)
    with torch.no_grad():
        soft = (m + sigma * delta).detach()
        cond = text.encode_embeddings(soft)
        near = text.nearest_words(soft)
    frames_t = torch.stack(frames) if frames else torch.zeros(0, *imgs.shape[1:])
    return DiffExplainerResult(soft=soft.cpu(), cond=cond.cpu(), words=near, prompt=template.surface(near),
                               frames=frames_t, frame_steps=frame_steps, trace=trace, seconds=time.time() - t0, nfe=nfe)


def run_diffexplainer(prior, target, template: Template, words: list[str], *, target_class: int | None = None,
                      config: DiffExplainerConfig | None = None, reader=None, factors=None, class_factor=None,
                      base_rates=None, threshold: float = 0.3, callback=None, **config_overrides) -> DiffExplainerResult:
    """DiffExplainer end to end (the Python API). ``target``: a classifier (with ``target_class``) or a
    ``featinv.explain.score`` target (``UnitTarget`` for a hidden unit). Scores the soft conditioning and its
    nearest-word prompt (activation score) and, given a reader, reports as ``run_dexter`` does."""
    cfg = dataclasses.replace(config or DiffExplainerConfig(), **config_overrides)
    if target_class is not None:
        target = ClassTarget(target, target_class, loss=cfg.loss)
    res = diffexplainer(prior, target, template, words, cfg, callback=callback)
    kw = dict(n=cfg.score_samples, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale, seed=10_000 + cfg.seed)
    res.activation = activation_score(prior, target, res.cond.to(prior.device), return_images=True, **kw)
    with torch.no_grad():
        text = SlotTextEncoder(prior.text_encoder, prior.tokenizer, template, words, dtype=prior.dtype).to(prior.device)
        res.activation_words = activation_score(prior, target, text.encode_words(res.words), **kw)
    if reader is not None:
        from featinv.explain.reporter import read_frames, report

        res.report = report(read_frames(reader, res.frames), factors, class_factor, threshold=threshold,
                            base_rates=base_rates)
    return res
