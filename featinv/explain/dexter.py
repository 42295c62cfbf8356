"""DEXTER (Carnemolla et al., arXiv 2510.14741; code perceivelab/dexter): explain a classifier's class by
the words of a prompt that makes a diffusion model generate images the classifier assigns to it.

One optimisation step (``dexter``; the authors' ``analyze_classifier``), only the soft prompt learns:

1. text: the masked LM (``featinv.explain.mlm.WordMLM``) reads [soft prompt] + the template with every slot
   masked; each slot's logits over the candidate words (``typed_slots``: only the template's words for
   that slot, a featinv option) -> hard Gumbel-softmax (tau = 1) one-hot ->
   translation x token embeddings -> the prior's text encoder (``featinv.explain.prompt.SlotTextEncoder``);
2. vision: ``batch`` images from *fixed* noise with the few-step sampler unrolled to the conditioning
   (``featinv.explain.unrolled``), CFG per the config;
3. loss = CE(classifier(images), c) [+ salient-feature losses] + ``mlm_weight`` * L_MLM, L_MLM = the masked
   LM's cross-entropy at the slots against the current *pseudo-label* words; AdamW (lr 0.1, eps 1e-4);
4. frames: every image the classifier assigns to c is saved with the step's words;
5. pseudo-labels (the authors' rule, per slot i with loss l_i - the CE, or its salient feature's loss):
   if the predicted word equals the target, append l_i to the slot's history; else if l_i < mean(history_i)
   and CE < mean(history of slot 0 (CE)) and the predicted words are not a previous restart's target,
   the target becomes the predicted word and the history restarts at l_i;
6. stop after ``stop_after`` consecutive steps whose images are all assigned to c (authors: 3), or ``steps``.

``restarts`` repeats 1-6 with a fresh soft prompt (the authors' ``topk`` loop); frames accumulate. The
explanation is the final pseudo-label words of each restart (the authors' "target prompt");
``DexterResult.words`` is the first (``select="first"``, the authors) or, ``select="best"`` (a featinv option),
the restart whose words the classifier assigns to the class most often on ``select_samples`` samples of seeds
30000 + seed.. (disjoint from the activation score's 10000 + seed..), so one failed optimisation does not stand
as the explanation. ``DexterResult.label_updates`` counts each restart's pseudo-label changes; an explanation that
is still the random initial draw (no step beat the step-0 loss, which starts every history) is warned about. ``run_dexter`` adds the activation score of that prompt and, given a reader, the report
(``featinv.explain.reporter``). Differences from the authors' setting are listed in docs/explain.md.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from featinv.contract import make_generators, randn
from featinv.explain.prompt import SlotTextEncoder, Template
from featinv.explain.score import ClassTarget, activation_score
from featinv.explain.unrolled import unrolled_sample

__all__ = ["DexterConfig", "DexterResult", "dexter", "run_dexter", "gumbel_softmax_hard", "candidate_words",
           "update_pseudo_labels", "slot_mask", "slot_sweep"]


@dataclass
class DexterConfig:
    """Hyper-parameters (authors' defaults in brackets; ``benchmarks/results/dexter.md`` says which were
    chosen on validation)."""

    steps: int = 150  # optimisation steps per restart [1000-5000 on SD]
    lr: float = 0.1  # AdamW on the soft prompt [0.1, eps 1e-4]
    tau: float = 1.0  # Gumbel-softmax temperature [1]
    n_soft_prompt: int = 1  # soft prompt vectors [1], init U(-1, 1)
    mlm_weight: float = 1.0  # weight of L_MLM [1]
    sample_steps: int = 8  # unrolled DDIM steps [4 LCM steps]
    cfg_scale: float = 1.0  # classifier-free guidance while optimising and scoring [1.0]
    batch: int = 2  # fixed noises per step [bs 1, seed 0]
    stop_after: int | None = None  # consecutive all-hit steps to stop [3]; None: run every step
    restarts: int = 1  # fresh soft prompts [topk 1]
    checkpoint: bool = False  # gradient checkpointing of the unrolled UNet calls
    typed_slots: bool = False  # each slot draws only from its template's ``slot_vocab`` [False: every word]
    score_samples: int = 100  # activation score: samples from the final prompt [100]
    select: str = "first"  # which restart's words explain: "first" [authors] or "best" (module docstring)
    select_samples: int = 16  # select="best": samples per restart's words
    seed: int = 0

    def __post_init__(self):
        for k in ("steps", "n_soft_prompt", "sample_steps", "batch", "restarts", "score_samples", "select_samples"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DEXTER: {k}={v!r} must be an integer >= 1")
        if self.stop_after is not None and (not isinstance(self.stop_after, int) or self.stop_after < 1):
            raise ValueError(f"DEXTER: stop_after={self.stop_after!r} must be an integer >= 1 or null")
        for k in ("lr", "tau"):
            if not getattr(self, k) > 0:
                raise ValueError(f"DEXTER: {k} must be > 0")
        if self.mlm_weight < 0 or self.cfg_scale < 0:
            raise ValueError("DEXTER: mlm_weight and cfg_scale must be >= 0")
        if self.select not in ("first", "best"):
            raise ValueError(f"DEXTER: select={self.select!r} must be 'first' or 'best'")


@dataclass
class DexterResult:
    words: list[str]  # the explanation: final pseudo-label words of the selected restart
    prompt: str  # its surface prompt (what the prior reads)
    restarts: list[list[str]]  # final words of every restart
    frames: torch.Tensor  # (N, C, H, W) images assigned to the class while optimising
    frame_steps: list[int]
    frame_words: list[list[str]]
    trace: list[dict]  # one row per step: restart, step, words, targets, ce, mlm, hit rate, value
    seconds: float
    nfe: int  # UNet evaluations (forward) while optimising, CFG doubling included
    activation: dict = field(default_factory=dict)  # run_dexter: activation score of ``prompt`` (+ its samples)
    report: object = None  # run_dexter with a reader: featinv.explain.reporter.Report
    sweep: object = None  # run_dexter with a reader and ``variants``: reporter.sweep_report's Report
    contrast: object = None  # the same sweep read by reporter.contrast_report
    chosen: int = 0  # the restart whose words are ``words``
    selection: list[float] = field(default_factory=list)  # select="best": each restart's hit rate

    @property
    def label_updates(self) -> list[int]:
        """Per restart, the steps at which a pseudo-label changed, read from the trace (step 0 never changes
        them: its loss starts the histories). 0: the words are the restart's random initial draw - no step's loss
        beat the step-0 loss - and explain nothing."""
        n, last = [0] * len(self.restarts), {}
        for row in self.trace:
            r = row["restart"]
            n[r] += r in last and row["targets"] != last[r]
            last[r] = row["targets"]
        return n


def gumbel_softmax_hard(logits: torch.Tensor, tau: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hard Gumbel-softmax (Jang et al. 2017) with a seeded generator: the forward value is the one-hot of
    argmax(logits + g), the gradient that of softmax((logits + g) / tau) (straight-through)."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    g = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-12))).to(logits.dtype)
    y = ((logits + g) / tau).softmax(dim=-1)
    hard = F.one_hot(y.argmax(dim=-1), y.shape[-1]).to(y.dtype)
    return hard - y.detach() + y


def candidate_words(mlm, tokenizer) -> list[str]:
    """The masked LM's words that are single tokens of the prior's tokenizer (the translation matrix's
    non-zero rows: identity on shared words)."""
    from featinv.explain.mlm import SPECIALS

    out = []
    for w in mlm.vocab[len(SPECIALS):]:
        if len(tokenizer(w, add_special_tokens=False).input_ids) == 1:
            out.append(w)
    return out


def dexter(prior, target, mlm, template: Template, config: DexterConfig | None = None, *,
           callback=None) -> DexterResult:
    """Run DEXTER's optimisation (module docstring) for ``target`` (``featinv.explain.score.ClassTarget``)."""
    cfg = config or DexterConfig()
    if prior.text_encoder is None:
        raise ValueError("DEXTER needs a text-conditioned prior (a text encoder and tokenizer)")
    dev = prior.device
    words = candidate_words(mlm, prior.tokenizer)
    text = SlotTextEncoder(prior.text_encoder, prior.tokenizer, template, words, dtype=prior.dtype).to(dev)
    mlm = mlm.to(dev).eval().requires_grad_(False)
    cand = torch.tensor([mlm.index[w] for w in words], device=dev)
    allowed = slot_mask(template, words, cfg.typed_slots).to(dev)  # (S, V) bool
    ids = mlm.encode([template.fill(["[MASK]"] * template.n_slots)])
    slot_pos = torch.tensor([i + 1 for i, p in enumerate(template.parts) if p == "{}"], device=dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = randn(make_generators(range(cfg.seed, cfg.seed + cfg.batch)), prior.latent_shape, device=dev)
    t0, nfe = time.time(), 0
    frames, frame_steps, frame_words, trace, finals = [], [], [], [], []
    for r in range(cfg.restarts):
        soft = torch.empty(1, cfg.n_soft_prompt, mlm.hidden_size).uniform_(-1, 1, generator=gen).to(dev)
        soft.requires_grad_(True)
        opt = torch.optim.AdamW([soft], lr=cfg.lr, eps=1e-4)
        if cfg.typed_slots:  # a random allowed word per slot
            targets = [words[int(j)] for j in torch.multinomial(allowed.cpu().float(), 1, generator=gen)[:, 0]]
        else:
            targets = [words[int(j)] for j in torch.randint(len(words), (template.n_slots,), generator=gen)]
        history: list[list[float]] | None = None  # per slot: losses since its target last changed
        streak = 0
        for step in range(cfg.steps):
            logits = mlm(ids, soft)[0, slot_pos]  # (S, V)
            y = gumbel_softmax_hard(logits[:, cand].masked_fill(~allowed, float("-inf")), cfg.tau, gen)
            pred = [words[j] for j in y.argmax(dim=1).tolist()]
            cond = text.encode_onehot(y)
            imgs = unrolled_sample(prior, cond, noise, cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                                   checkpoint=cfg.checkpoint)
            nfe += cfg.sample_steps * cfg.batch * (2 if cfg.cfg_scale != 1.0 else 1)
            sc = target(imgs)
            ce = sc.loss.mean()
            label = torch.tensor([mlm.index[w] for w in targets], device=dev)
            l_mlm = F.cross_entropy(logits, label)
            loss = ce + cfg.mlm_weight * l_mlm
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if soft.grad is not None and not torch.isfinite(soft.grad).all():
                soft.grad = torch.nan_to_num(soft.grad, nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
            hit = sc.hit.detach().cpu()
            for b in hit.nonzero().flatten().tolist():
                frames.append(imgs[b].detach().float().cpu())
                frame_steps.append(step)
                frame_words.append(list(pred))
            # pseudo-labels (the authors' rule)
            n_l = sc.slot_losses.shape[1] if sc.slot_losses is not None else 1
            per = (sc.slot_losses.detach().mean(0).tolist() if sc.slot_losses is not None else [ce.item()])
            slot_loss = [per[i] if i < n_l else ce.item() for i in range(template.n_slots)]
            history = update_pseudo_labels(pred, targets, history, slot_loss, ce.item(), finals)
            row = dict(restart=r, step=step, words=" ".join(pred), targets=" ".join(targets), ce=round(ce.item(), 5),
                       mlm=round(l_mlm.item(), 5), hit_rate=round(float(hit.float().mean()), 4),
                       value=round(float(sc.value.detach().mean()), 5))
            trace.append(row)
            if callback is not None:
                callback(row)
            streak = streak + 1 if bool(hit.all()) else 0
            if cfg.stop_after is not None and streak >= cfg.stop_after:
                break
        finals.append(list(targets))
    chosen, selection = 0, []
    if cfg.select == "best" and len(finals) > 1:
        with torch.no_grad():
            for r, w in enumerate(finals):
                cond = text.encode_words(w)
                sel = activation_score(prior, target, cond, n=cfg.select_samples, steps=cfg.sample_steps,
                                       cfg_scale=cfg.cfg_scale, seed=30_000 + cfg.seed)
                nfe += cfg.sample_steps * cfg.select_samples * (2 if cfg.cfg_scale != 1.0 else 1)
                selection.append(sel["score"])
        chosen = max(range(len(finals)), key=lambda r: (selection[r], -r))  # ties: the earliest
    frames_t = torch.stack(frames) if frames else torch.zeros(0, *_image_shape(prior))
    res = DexterResult(words=finals[chosen], prompt=template.surface(finals[chosen]), restarts=finals,
                       frames=frames_t, frame_steps=frame_steps, frame_words=frame_words, trace=trace,
                       seconds=time.time() - t0, nfe=nfe, chosen=chosen, selection=selection)
    if res.label_updates[chosen] == 0:
        warnings.warn(f"DEXTER: the explanation {res.prompt!r} (restart {chosen}) is the random initial pseudo-label "
                      "draw - no step's loss beat the step-0 loss (docs/dexter.md) - so it explains nothing")
    return res


def slot_mask(template: Template, words: list[str], typed: bool) -> torch.Tensor:
    """(slots, words) bool: which candidate ``words`` each slot may take - all of them (the authors), or
    with ``typed`` only the template's ``slot_vocab`` (a featinv option: the shapes grammar types its
    slots, and an untyped slot can settle on a word of another factor, "at the bottom middle white ...")."""
    if not typed:
        return torch.ones(template.n_slots, len(words), dtype=torch.bool)
    if template.slot_vocab is None:
        raise ValueError("DEXTER typed_slots needs a template with slot_vocab (one word list per slot)")
    index = {w: j for j, w in enumerate(words)}
    missing = sorted({w for v in template.slot_vocab for w in v} - set(index))
    if missing:
        raise ValueError(f"DEXTER typed_slots: slot words {missing} are not candidate words of the masked LM "
                         "and the prior's tokenizer")
    m = torch.zeros(template.n_slots, len(words), dtype=torch.bool)
    for i, v in enumerate(template.slot_vocab):
        m[i, [index[w] for w in v]] = True
    return m


def update_pseudo_labels(pred: list[str], targets: list[str], history: list[list[float]] | None,
                         slot_loss: list[float], ce: float, previous: list[list[str]]) -> list[list[float]]:
    """DEXTER's pseudo-label update (module docstring, step 5), in place on ``targets``; returns the
    histories. ``history`` None (the first step) starts every slot's history at its loss; ``previous``:
    earlier restarts' final targets (a predicted tuple equal to one of them never becomes the target)."""
    if history is None:
        history = [[v] for v in slot_loss]
    ce_improved = ce < sum(history[0]) / len(history[0])
    seen = tuple(pred) in {tuple(f) for f in previous}
    for i in range(len(targets)):
        if pred[i] == targets[i]:
            history[i].append(slot_loss[i])
        elif slot_loss[i] < sum(history[i]) / len(history[i]) and ce_improved and not seen:
            history[i], targets[i] = [slot_loss[i]], pred[i]
    return history


def _image_shape(prior) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(prior.decode(torch.zeros(1, *prior.latent_shape, device=prior.device)).shape[1:])


def run_dexter(prior, classifier, target_class: int, *, mlm, template: Template, config: DexterConfig | None = None,
               reader=None, factors: dict[str, list[str]] | None = None, class_factor: str | None = None,
               base_rates=None, threshold: float = 0.3, variants=None, sweep_samples: int = 16, callback=None,
               **config_overrides) -> DexterResult:
    """DEXTER end to end (the Python API): optimise, score the final prompt (``activation`` = the share of
    ``config.score_samples`` samples classified as ``target_class``) and, given a ``reader`` (``read(images)
    -> {factor: (values, confidence)}``) and the world's ``factors``, report over-represented factors.

    ``variants`` (``words -> {factor: [words, ...]}``, e.g. ``featinv.explain.shapes.slot_variants``) adds
    the counterfactual reports ``sweep`` (``reporter.sweep_report``) and ``contrast``
    (``reporter.contrast_report``) of one sweep: ``sweep_samples`` samples of every
    variant of the final words, the same seeds for all. ``config_overrides`` replace fields of ``config``
    (e.g. ``steps=50``).
    """
    cfg = dataclasses.replace(config or DexterConfig(), **config_overrides)
    target = ClassTarget(classifier, target_class)
    res = dexter(prior, target, mlm, template, cfg, callback=callback)
    with torch.no_grad():
        enc = SlotTextEncoder(prior.text_encoder, prior.tokenizer, template, candidate_words(mlm, prior.tokenizer),
                              dtype=prior.dtype).to(prior.device)
        cond = enc.encode_words(res.words)
    res.activation = activation_score(prior, target, cond, n=cfg.score_samples, steps=cfg.sample_steps,
                                      cfg_scale=cfg.cfg_scale, seed=10_000 + cfg.seed, return_images=True)
    if reader is not None:
        from featinv.explain.reporter import read_frames, report

        if factors is None:
            raise ValueError("a reader needs the world's `factors` (factor -> value names)")
        res.report = report(read_frames(reader, res.frames), factors, class_factor, threshold=threshold,
                            base_rates=base_rates)
        if variants is not None:
            res.sweep, res.contrast = slot_sweep(prior, target, enc, variants(res.words), reader, factors,
                                                 class_factor, n=sweep_samples, steps=cfg.sample_steps,
                                                 cfg_scale=cfg.cfg_scale, seed=20_000 + cfg.seed, threshold=threshold)
    return res


@torch.no_grad()
def slot_sweep(prior, target, encoder: SlotTextEncoder, variants: dict[str, list[list[str]]], reader,
               factors: dict[str, list[str]], class_factor: str | None, *, n: int, steps: int, cfg_scale: float,
               seed: int, threshold: float = 0.3):
    """The counterfactual reports (``reporter.sweep_report``, ``reporter.contrast_report`` at its own
    threshold): ``n`` samples of each variant of the final words (noise of sample i from seed ``seed + i`` for
    every variant), read by ``reader`` and scored by ``target``. A variant shared by several factors' sweeps
    (the final words themselves) is sampled once."""
    from featinv.explain.reporter import contrast_report, read_frames, sweep_report
    from featinv.explain.score import sample_from

    done: dict[tuple[str, ...], tuple[torch.Tensor, dict]] = {}

    def scored(words):  # (hits (n,), reader values {factor: (n,)}) of one variant
        key = tuple(words)
        if key not in done:
            imgs = sample_from(prior, encoder.encode_words(words), n, steps=steps, cfg_scale=cfg_scale, seed=seed)
            done[key] = target(imgs.to(prior.device)).hit.cpu(), read_frames(reader, imgs)
        return done[key]

    readings, hits = {}, {}
    for factor, word_lists in variants.items():
        parts = [scored(words) for words in word_lists]
        hits[factor] = torch.cat([h for h, _ in parts])
        readings[factor] = torch.cat([r[factor] for _, r in parts])
    return (sweep_report(readings, hits, factors, class_factor, threshold=threshold),
            contrast_report(readings, hits, factors, class_factor))
