"""DiffEx's editor: LEDITS++ (Brack et al., CVPR 2024) through diffusers'
``LEditsPPPipelineStableDiffusion``, inverted once per (image set, seed) and reused for every keyword.

LEDITS++ inverts an image with edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024; the
DPM-Solver++ SDE variant by default) into an initial latent and per-step noise maps, then re-runs
the sampler with semantic guidance toward the editing prompts, masked per concept by the
intersection of a cross-attention mask and a noise-estimate mask (``edit_threshold`` = their
quantile, Eq. 12). The pipeline keeps only the *last* inversion; this wrapper stores each seed's
inversion state (initial latents, noise maps, timesteps) and restores it before an edit, so one
inversion serves every keyword (DiffEx steps 4-5). Everything else is the library's pipeline, except
two fixes: its attention store mixes the images of a batch (``_batched_store_call``), so edits are made
batch-correct here (tested: the store's maps equal the one-image maps exactly, and a batched edit equals
the one-image edits at edit_threshold 0, where no quantile mask can flip on a last-bit difference).

In-context edits (``captions``, featinv's option; DiffEx edits with the bare keyword prompt): each image is
inverted with its own caption as the source prompt and edited toward that caption with the keyword put in
(``rewrite``), with the caption as the base of the edit guidance, so the guidance direction
eps(edited caption) - eps(caption) names only the change. The library's ``invert`` guides the source prompt
the wrong way round (``encode_prompt`` returns (edit, negative) and ``invert`` unpacks them as (negative,
edit), so a source prompt is followed with scale 1 - s); here the inversion uses eps(caption) itself, the
base the edit then uses. The pipeline encodes one prompt per concept for the whole batch, so these edits run
one image at a time.

``edit_threshold=0`` switches the implicit masks off (every quantile is the minimum): the guidance is then
eps(base) + s_e (eps(edited) - eps(base)) everywhere, and an in-context edit at ``edit_guidance_scale=1`` is
plain sampling of the edited caption from the caption's edit-friendly noise maps -- the editing of
Huberman-Spiegelglas et al. (2024), which LEDITS++ builds on.

Not changed: the pipeline's token count for a concept's cross-attention mask is the tokenizer's ``length``,
which with ``padding="max_length"`` is the padded length (transformers 5), so the mask sums the attention
over every token position, padding included, for every prompt (tested).

Seeds: DiffEx averages a keyword's effect over ``n_samples`` seeded edits; with LEDITS++ the
randomness is the inversion noise, drawn here per image from ``target_seed(seed, "diffex", id)``
so an image's edit never depends on its batch companions.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from featinv.api import target_seed
from featinv.contract import make_generators

__all__ = ["LeditsEditor", "load_ledits_pipeline"]

_STATE = ("init_latents", "zs", "inversion_steps", "batch_size", "eta")


def _batched_store_call(self, attn, is_cross: bool, place_in_unet: str, editing_prompts, PnP=False):
    """``LeditsAttentionStore.__call__`` for a batch of several images. The library's version splits the
    (concept x image x head, query, key) attention rows into chunks of ``batch_size`` rows, which mixes
    images and heads as soon as both exceed one: each image's cross-attention mask is then built from
    other images' maps (an edit depends on its batch companions). Here the rows are viewed as
    (concept, image, head) and regrouped per image as (concept x head): the layout the store's
    ``aggregate_attention`` reads, identical to the library's for a single image."""
    if attn.shape[1] <= self.max_size:
        bs, skip = 1 + int(PnP) + editing_prompts, (2 if PnP else 1)
        heads = attn.shape[0] // (bs * self.batch_size)
        a = attn.view(bs, self.batch_size, heads, *attn.shape[1:])[skip:]
        self.forward(a.transpose(0, 1).reshape(self.batch_size, (bs - skip) * heads, *attn.shape[1:]),
                     is_cross, place_in_unet)


def _pipeline_class():
    from diffusers import LEditsPPPipelineStableDiffusion
    from diffusers.pipelines.ledits_pp.pipeline_leditspp_stable_diffusion import LeditsAttentionStore

    class BatchedStore(LeditsAttentionStore):
        __call__ = _batched_store_call

    class BatchedLEditsPP(LEditsPPPipelineStableDiffusion):
        """diffusers' LEDITS++ pipeline with a batch-correct attention store (``_batched_store_call``)."""

        def encode_prompt(self, *args, **kwargs):
            emb, neg, n_tokens = super().encode_prompt(*args, **kwargs)
            if getattr(self, "_invert_with_source", False) and emb is not None:
                # invert(): guide nothing, use eps(source prompt) itself (the library still runs the UNet twice a
                # step on the same input at source_guidance_scale 3.5; a scale <= 1 would crash it)
                return emb, emb, n_tokens
            return emb, neg, n_tokens

        def prepare_unet(self, attention_store, PnP: bool = False):
            if type(attention_store) is LeditsAttentionStore:
                attention_store.__class__ = BatchedStore
            return super().prepare_unet(attention_store, PnP)

    return BatchedLEditsPP


def load_ledits_pipeline(folder: str | Path, scheduler: str = "dpmsolver++"):
    """``LEditsPPPipelineStableDiffusion`` of a Stable-Diffusion-layout folder (CPU, fp32, no safety
    checker), with the batch-correct attention store. ``scheduler``: ``dpmsolver++`` (2nd-order SDE
    DPM-Solver++, the pipeline's choice; any prediction type) or ``ddim`` (edit-friendly DDPM inversion;
    the library's DDIM inversion assumes epsilon prediction, so other priors are refused)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from featinv.hub import hub_call

    pipe = hub_call(_pipeline_class().from_pretrained, str(folder), safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False, local_files_only=True)
    if scheduler == "ddim":
        kind = pipe.scheduler.config.get("prediction_type", "epsilon")
        if kind != "epsilon":  # diffusers' compute_noise_ddim reads the UNet output as eps
            raise ValueError(f"LEDITS++ with ddim needs an epsilon-prediction prior, {folder} predicts {kind!r}: "
                             "use scheduler='dpmsolver++'")
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "dpmsolver++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                 algorithm_type="sde-dpmsolver++", solver_order=2)
    else:
        raise ValueError(f"scheduler must be 'dpmsolver++' or 'ddim', got {scheduler!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


class LeditsEditor:
    """Edits a fixed image set with keyword prompts (DiffEx's editor).

    Args:
        pipe: a ``LEditsPPPipelineStableDiffusion`` (``load_ledits_pipeline``).
        images: (N, 3, H, W) in [0, 1]; ``ids``: their stable ids (default 0..N-1) for per-image seeds.
        steps: inversion (= editing) steps; ``skip``: share of initial steps skipped (lower = stronger edits);
        edit_guidance_scale, edit_threshold: LEDITS++ s_e and lambda (the paper's 10 and 0.75 for SD-1.5;
            lambda = 0: no mask, see the module docstring);
        batch: images per inversion / edit call.
        combine: how a multi-prompt edit adds its concepts' guidance: ``sum`` (LEDITS++: each at
            ``edit_guidance_scale``) or ``mean`` (each at ``edit_guidance_scale / K``: K alternatives of one
            factor, e.g. a DiffEx family "warm" = red, orange, yellow, edited as their mean direction).
        captions, rewrite: in-context edits (see the module docstring): ``captions[i]`` describes image i
            (e.g. from a captioner) and ``rewrite(prompt, caption)`` puts an editing prompt's keyword into
            a caption; both or neither. In-context edits run one image per call.
    """

    exact = False

    def __init__(self, pipe, images: torch.Tensor, ids: Sequence[int] | None = None, *, steps: int = 20,
                 skip: float = 0.1, edit_guidance_scale: float = 10.0, edit_threshold: float = 0.75,
                 batch: int = 64, combine: str = "sum", captions: Sequence[str] | None = None,
                 rewrite: Callable[[str, str], str] | None = None):
        if (captions is None) != (rewrite is None):
            raise ValueError("in-context edits need both captions and rewrite (or neither)")
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images")
        if not 0 <= skip < 1:
            raise ValueError(f"skip must be in [0, 1), got {skip}")
        if not 0 <= edit_threshold <= 1 or edit_guidance_scale <= 0 or steps < 1:
            raise ValueError(f"LEDITS++ needs edit_threshold in [0, 1], edit_guidance_scale > 0 and steps >= 1, got "
                             f"{edit_threshold}, {edit_guidance_scale}, {steps}")
        if combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {combine!r}")
        self.combine = combine
        self.pipe, self.images = pipe, images.detach().float().cpu().clamp(0, 1)
        self.ids = list(range(len(images))) if ids is None else [int(i) for i in ids]
        if len(self.ids) != len(self.images):
            raise ValueError(f"{len(self.ids)} ids for {len(self.images)} images")
        self.captions, self.rewrite = (None, None) if captions is None else (list(captions), rewrite)
        self.steps, self.skip = int(steps), float(skip)
        self.batch = 1 if captions is not None else int(batch)
        self.edit_guidance_scale, self.edit_threshold = float(edit_guidance_scale), float(edit_threshold)
        self._inversions: dict[tuple[int, int], dict] = {}
        self.inversions = self.edits = 0

    def config(self) -> dict:
        return {"editor": "ledits++", "scheduler": type(self.pipe.scheduler).__name__, "steps": self.steps,
                "skip": self.skip, "edit_guidance_scale": self.edit_guidance_scale,
                "edit_threshold": self.edit_threshold, "combine": self.combine, "context": self.captions is not None}

    def _restore(self, seed: int, start: int) -> None:
        key = (int(seed), start)
        if key not in self._inversions:
            chunk = self.images[start:start + self.batch]
            gens = make_generators([target_seed(seed, "diffex", i) for i in self.ids[start:start + len(chunk)]])
            source = "" if self.captions is None else self.captions[start]
            self.pipe._invert_with_source = bool(source)
            try:
                self.pipe.invert(image=chunk, num_inversion_steps=self.steps, skip=self.skip, generator=gens,
                                 source_prompt=source)
            finally:
                self.pipe._invert_with_source = False
            self._inversions[key] = {k: getattr(self.pipe, k) for k in _STATE}
            self.inversions += 1
        for k, v in self._inversions[key].items():
            setattr(self.pipe, k, v)

    @torch.no_grad()
    def edit(self, prompts: str | Sequence[str], seed: int = 0) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1]: every image edited toward ``prompts`` (several = one multi-concept
        LEDITS++ edit, each concept with its own implicit mask, guidance added as ``combine`` says), from the
        inversion of ``seed``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        scale = self.edit_guidance_scale / (len(prompts) if self.combine == "mean" else 1)
        out = []
        for start in range(0, len(self.images), self.batch):
            self._restore(seed, start)
            base, edit = None, prompts
            if self.captions is not None:
                base = self.captions[start]
                edit = [self.rewrite(p, base) for p in prompts]
            res = self.pipe(editing_prompt=edit, negative_prompt=base, edit_guidance_scale=scale,
                            edit_threshold=self.edit_threshold, output_type="pt", return_dict=True)
            out.append(res.images.float().cpu().clamp(0, 1))
        self.edits += 1
        return torch.cat(out)

    @torch.no_grad()
    def reconstruct(self, seed: int = 0) -> torch.Tensor:
        """The inversion re-sampled without an edit (what an empty edit gives)."""
        out = []
        for start in range(0, len(self.images), self.batch):
            self._restore(seed, start)
            base = None if self.captions is None else self.captions[start]
            out.append(self.pipe(editing_prompt=None, negative_prompt=base, output_type="pt").images.float().cpu()
                       .clamp(0, 1))
        return torch.cat(out)
