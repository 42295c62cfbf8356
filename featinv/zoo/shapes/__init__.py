"""The shapes world: procedurally rendered scenes with known factors, a miniature Stable Diffusion
trained on their captions, judges (readers) and encoders with designed, measured properties.

Specs (registered in ``featinv.zoo``): priors ``zoo:shapes-sd`` (single object; the empty prompt is
the unconditional prior), ``zoo:shapes-multi-sd`` (DEPICT's multi-object scenes) and ``zoo:shapes-pixel``
(single object, pixel space: the issue's fallback, measured beside ``shapes-sd``); encoders
``zoo:shapes-shape``, ``zoo:shapes-color``, ``zoo:shapes-invariant`` (default layer ``penultimate``),
``zoo:shapes-clip`` (open_clip mini-CLIP, default: image embedding, ``encode_text`` works) and
``zoo:shapes-target-<name>`` (target classifiers, default: logits). Modules: ``world`` (renderer,
captions, splits, oracle edits), ``text`` (tokenizer), ``sd`` (the SD folders), ``reader`` (judges),
``encoders``, ``clip``, ``targets``, ``probes``, ``train`` (``python -m featinv.zoo.train --what shapes``).
"""
from __future__ import annotations

from pathlib import Path

from featinv.zoo.shapes import world
from featinv.zoo.shapes.reader import load_detector as load_concept_detector
from featinv.zoo.shapes.reader import load_reader, read_factors, read_presence
from featinv.zoo.shapes.world import CONCEPTS, FACTORS, HIERARCHY, load_split

__all__ = ["world", "FACTORS", "CONCEPTS", "HIERARCHY", "load_split", "PRIOR_NAMES", "ENCODER_NAMES", "TARGET_NAMES",
           "shapes_sd_dir", "load_prior", "load_reader", "read_factors", "load_concept_detector", "read_presence",
           "load_encoder", "load_target_classifier", "names"]

PRIOR_NAMES = ("shapes-sd", "shapes-multi-sd", "shapes-pixel")
ENCODER_NAMES = ("shapes-shape", "shapes-color", "shapes-invariant", "shapes-clip")


def _target_names() -> tuple[str, ...]:
    from featinv.zoo.shapes import targets

    return targets.NAMES


TARGET_NAMES = _target_names()


def names() -> dict[str, tuple[str, ...]]:
    """Every zoo name of the shapes world, by kind (target classifiers as encoders: ``shapes-target-<t>``)."""
    return {"priors": PRIOR_NAMES, "encoders": ENCODER_NAMES + tuple(f"shapes-target-{t}" for t in TARGET_NAMES),
            "targets": TARGET_NAMES}


def shapes_sd_dir(name: str = "shapes-sd", root: str | Path | None = None) -> Path:
    """The folder of ``name``: Stable Diffusion's layout (``shapes-sd``, ``shapes-multi-sd``) or the pixel prior's
    (``shapes-pixel``: ``unet/ text_encoder/ tokenizer/ scheduler/``)."""
    from featinv.zoo.shapes.sd import PIXEL_NAME, sd_dir

    folder = sd_dir(name, root)
    marker = folder / ("unet/config.json" if name == PIXEL_NAME else "model_index.json")
    if not marker.exists() and name == PIXEL_NAME:
        raise FileNotFoundError(f"{folder} has no {name} prior: the pixel-space fallback is not committed (measured, not "
                                f"adopted: docs/design.md); train it (~62 min on 2 CPU cores) with `python -m "
                                f"featinv.zoo.train --what shapes-pixel --out DIR` and use zoo:shapes-pixel?path=DIR")
    if not marker.exists():
        raise FileNotFoundError(f"{folder} is not a trained {name} folder; run `python -m featinv.zoo.train --what shapes`")
    return folder


def load_prior(name: str = "shapes-sd", root: str | Path | None = None, **kw):
    """``featinv.LatentPrior`` of a shapes SD folder, ``featinv.PixelPrior`` of ``shapes-pixel``; ``kw`` as their
    ``from_pretrained`` (prompt, cfg_scale)."""
    from featinv.priors import LatentPrior, PixelPrior
    from featinv.zoo.shapes.sd import PIXEL_NAME

    cls = PixelPrior if name == PIXEL_NAME else LatentPrior
    return cls.from_pretrained(shapes_sd_dir(name, root), local_files_only=True, **kw)


def load_target_classifier(name: str, root: str | Path | None = None):
    """A target classifier (``targets.NAMES``) as an eval-mode ``nn.Module``: images -> logits."""
    from featinv.zoo.shapes import targets

    return targets.load_model(name, root)


def load_encoder(name: str, layer: str | None = None, *, quantize: bool = False, pool: str | None = None,
                 call: int | None = None, normalize: bool = False, root: str | Path | None = None):
    """``featinv.Encoder`` of a shapes model (``ENCODER_NAMES`` or ``shapes-target-<t>``) at ``layer``.

    Defaults: ``penultimate`` for the CNN encoders, the image embedding for ``shapes-clip``, the logits
    for target classifiers; ``logits``/``output`` selects the model output.
    """
    from featinv.encoders import Encoder

    if name == "shapes-clip":  # through the same open_clip path as a real CLIP (the clip: family)
        from featinv.models import clip_encoder
        from featinv.zoo.shapes.clip import clip_dir

        enc = clip_encoder(f"local-dir:{clip_dir(root)}", layer, quantize=quantize, pool=pool, call=call,
                           normalize=normalize)
        enc.name = f"zoo:shapes-clip@{enc.name.rsplit('@', 1)[-1]}"
        return enc
    if name.startswith("shapes-target-"):
        model, default = load_target_classifier(name[len("shapes-target-"):], root), None
    else:
        from featinv.zoo.shapes import encoders

        model, default = encoders.load_model(name, root), encoders.DEFAULT_LAYER
    layer = default if layer is None else (None if layer in ("logits", "output") else layer)
    return Encoder(model, layer, input_size=world.IMAGE_SIZE, in_chans=3, quantize=bool(quantize), pool=pool, call=call,
                   name=f"zoo:{name}@{layer or 'logits'}")
