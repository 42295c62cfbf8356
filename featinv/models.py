"""Real-model encoder families: ``timm``, ``torchvision`` and ``clip`` (open_clip), one spec syntax.

Spec (every family)::

    family:name[/weights][@layer][?key=value&key=value...]

* ``name``: the library's model name (``resnet50``, ``vit_base_patch16_224``, ``RN50``...).
* ``/weights``: which pretrained weights. torchvision: a weights enum member
  (``resnet50/IMAGENET1K_V1``, ``DEFAULT``; none = random init). clip: an open_clip pretrained tag
  or a checkpoint file (``RN50/openai``, ``ViT-B-32/laion2b_s34b_b79k``; none = random init).
  timm has no ``/`` part: the weights tag is part of timm's own name
  (``vit_base_patch16_224.augreg_in21k``); timm models are pretrained unless ``pretrained=false``
  or ``checkpoint_path=<file>`` is given.
* ``@layer``: a module name from ``featinv layers <spec>``; its output is the feature. Omitted (or
  ``@pre_logits``): the feature the classifier sees (timm: the model with ``reset_classifier(0)``;
  torchvision: the input of the last ``nn.Linear``, e.g. ``avgpool`` of ResNets, the CLS token after
  ``encoder.ln`` for ViTs). ``@logits``/``@output``: the model's full output. clip: layers are
  names inside ``model.visual``; omitted (or ``@embedding``) = the image embedding.
* ``?options``: keyword arguments, also accepted as Python keywords by ``build_encoder(spec, **kw)``
  (keywords win): ``pool`` (none|cls|avg, how a token/spatial map becomes a vector), ``quantize``
  (straight-through 8-bit rounding before the encoder, as the paper does), ``interpolation``
  (resize mode, default: the weights' own), ``pretrained``, ``checkpoint_path`` (timm),
  ``normalize`` (clip). Python-only: ``model_kwargs`` (a dict passed to the model constructor,
  e.g. tiny test configs; for open_clip give whole ``vision_cfg``/``text_cfg`` dicts, overrides
  are shallow).

Examples (Shirahama et al. 2025 use the last three)::

    timm:resnet50@global_pool            timm:vit_base_patch16_224@fc_norm
    torchvision:resnet50/IMAGENET1K_V1@avgpool                      # 2048-d penultimate
    torchvision:vit_h_14/IMAGENET1K_SWAG_E2E_V1@encoder.ln          # CLS token at 518 px (pool=cls default)
    clip:RN50/openai                                                # 1024-d image embedding

Preprocessing: the whole image (no centre crop; generated images are square) is resized to the
model's input size and normalised with the weights' mean/std; ``pool="cls"`` is the default for
torchvision ViTs at ``encoder.ln``. The resize mode (timm data config, torchvision weights'
transform, open_clip preprocess config: bicubic for CLIP and SWAG) is passed to ``Encoder`` as
``Encoder``'s ``interpolation``; ``?interpolation=`` overrides it.

CLIP text: ``ClipEncoder.encode_text(prompts) -> (B, D)`` is the raw (unnormalised) text
embedding, like the image side: the paper matches raw CLIP embeddings with the squared Euclidean
distance (its reference code feeds ``encode_text`` unnormalised). ``?normalize=true`` L2-normalises
both the image feature and the text embedding instead.

Missing weights offline (``HF_HUB_OFFLINE=1``) raise ``featinv.hub.WeightsNotFoundError`` at once,
naming the model, where it looked and how to provide the weights.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featinv.encoders import Encoder
from featinv.hub import WeightsNotFoundError, first_line, missing_weights, not_found, offline
from featinv.specs import register_encoder, suggest

__all__ = ["ClipEncoder", "timm_encoder", "torchvision_encoder", "clip_encoder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRE_LOGITS = ("pre_logits", "penultimate")
OUTPUT = ("logits", "output")


# -- building the Encoder ----------------------------------------------------------------------------
def _interp_name(mode) -> str:
    """torchvision InterpolationMode / PIL / str -> 'bilinear' | 'bicubic' | ..."""
    mode = getattr(mode, "value", mode)
    return str(mode).lower() if mode is not None else "bilinear"


def _pool(pool: str | None, label: str, spec: str) -> str | None:
    if pool is not None and label in ("pre_logits", "embedding", "logits"):
        raise ValueError(f"{spec}@{label} is already a vector: pool={pool!r} applies to a named layer whose output "
                         "is a token sequence or feature map (e.g. `@norm?pool=cls`)")
    return pool


def _hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else size[-2:]


# -- timm --------------------------------------------------------------------------------------------
@register_encoder("timm")
def timm_encoder(name: str, layer: str | None = None, *, pool: str | None = None, quantize: bool = False,
                 interpolation: str | None = None, call: int | None = None, pretrained: bool | None = None,
                 checkpoint_path: str | None = None, model_kwargs: dict | None = None) -> Encoder:
    """``timm:<name>[@layer]``; default layer: the pre-logits feature (``reset_classifier(0)``)."""
    import timm

    spec = f"timm:{name}"
    pretrained = (checkpoint_path is None) if pretrained is None else bool(pretrained)
    model_kwargs = dict(model_kwargs or {})
    if checkpoint_path is not None:
        if not os.path.isfile(str(checkpoint_path)):
            raise not_found(spec, where=f"checkpoint_path {str(checkpoint_path)!r}", reason=" (no such file)",
                             how="give the path of a timm/PyTorch checkpoint file that exists.")
        model_kwargs["checkpoint_path"] = str(checkpoint_path)
    if not name.startswith(("hf-hub:", "hf_hub:")) and not timm.is_model(name):
        raise KeyError(f"unknown timm model {name!r}.{suggest(name, timm.list_models())}")
    try:
        model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    except (OSError, WeightsNotFoundError) as e:  # LocalEntryNotFoundError, URLError, missing file
        raise _timm_missing(name, e) from e
    except RuntimeError as e:
        if any(s in str(e) for s in ("download", "Hub", "hub", "connection", "not found")):
            raise _timm_missing(name, e) from e
        raise

    if layer in OUTPUT:
        layer, label = None, "logits"
    elif layer is None or layer in PRE_LOGITS:
        model.reset_classifier(0)
        layer, label = None, "pre_logits"
    else:
        label = layer
    cfg = timm.data.resolve_data_config({}, model=model)
    in_chans, h, w = cfg["input_size"]
    return Encoder(model, layer, input_size=(h, w), in_chans=in_chans, mean=cfg["mean"], std=cfg["std"],
                   pool=_pool(pool, label, spec), quantize=bool(quantize), call=call, name=f"{spec}@{label}",
                   interpolation=_interp_name(interpolation or cfg.get("interpolation")))


def _timm_missing(name: str, e: Exception) -> WeightsNotFoundError:
    hub_id = None
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    except Exception:  # pragma: no cover - best effort for the message only
        pass
    model_id = hub_id or name
    return missing_weights(model_id, detail=(
        f"timm model {name!r}: {first_line(e)}. Alternatives: "
        f"`timm:{name}?checkpoint_path=/path/to/weights.safetensors` (a local file), or "
        f"`?pretrained=false` for random init."))


# -- torchvision ---------------------------------------------------------------------------------------
@register_encoder("torchvision")
def torchvision_encoder(name: str, layer: str | None = None, *, pool: str | None = None, quantize: bool = False,
                        interpolation: str | None = None, call: int | None = None, weights: str | None = None,
                        model_kwargs: dict | None = None) -> Encoder:
    """``torchvision:<name>[/<WEIGHTS>][@layer]``; no weights part = random init."""
    from torchvision import models as tvm

    model_name, _, weights_name = name.partition("/")
    weights_name = weights or weights_name or None
    if model_name not in tvm.list_models():
        raise KeyError(f"unknown torchvision model {model_name!r}.{suggest(model_name, tvm.list_models())}")
    weights = None
    if weights_name is not None:
        enum = tvm.get_model_weights(model_name)
        try:
            weights = enum[weights_name] if weights_name != "DEFAULT" else enum.DEFAULT
        except KeyError:
            raise KeyError(f"unknown weights {weights_name!r} for torchvision:{model_name}; known: "
                           f"{[w.name for w in enum]}.{suggest(weights_name, [w.name for w in enum])}") from None
        weights_name = weights.name
    spec = f"torchvision:{model_name}" + (f"/{weights_name}" if weights is not None else "")
    if weights is not None:
        _check_torch_cache(weights, spec)
    try:
        model = tvm.get_model(model_name, weights=weights, **dict(model_kwargs or {}))
    except OSError as e:  # URLError (no network), partial download
        raise _tv_missing(weights, spec, e) from e
    except RuntimeError as e:
        if "hash" in str(e) or "download" in str(e).lower():
            raise _tv_missing(weights, spec, e) from e
        raise

    explicit_pool = pool is not None
    if layer in OUTPUT:
        layer, label = None, "logits"
    elif layer is None or layer in PRE_LOGITS:
        head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not head:
            raise ValueError(f"{spec}: no nn.Linear classifier to take the pre-logits feature from; "
                             "name a layer (`featinv layers " + spec + "`)")
        layer, label = head[-1], "pre_logits"
        model.set_submodule(layer, nn.Identity())  # its output is now the classifier's input
    else:
        label = layer
        if not explicit_pool and model_name.startswith("vit_") and layer == "encoder.ln":
            pool = "cls"  # (B, 1 + N, D) tokens -> the CLS token the classifier head reads
    size, mean, std, interp = _tv_preprocessing(weights, model)
    return Encoder(model, layer, input_size=size, in_chans=3, mean=mean, std=std, pool=_pool(pool, label, spec),
                   quantize=bool(quantize), call=call, name=f"{spec}@{label}",
                   interpolation=_interp_name(interpolation or interp))


def _tv_preprocessing(weights, model):
    size, mean, std, interp = None, IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    if weights is not None:
        try:
            tr = weights.transforms()
            size = _hw(getattr(tr, "crop_size", None) or weights.meta.get("min_size"))
            mean, std = tuple(getattr(tr, "mean", mean)), tuple(getattr(tr, "std", std))
            interp = _interp_name(getattr(tr, "interpolation", interp))
        except Exception:  # non-classification transforms: fall back to the defaults
            pass
    if size is None:
        img = getattr(model, "image_size", None)  # torchvision ViT
        size = _hw(img if img is not None else 224)
    return size, mean, std, interp


def _torch_cache_file(weights) -> str:
    from urllib.parse import urlparse

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def _check_torch_cache(weights, spec: str) -> None:
    path = _torch_cache_file(weights)
    if offline() and not os.path.isfile(path):
        raise _tv_missing(weights, spec, None)


def _tv_missing(weights, spec: str, e: Exception | None) -> WeightsNotFoundError:
    path = _torch_cache_file(weights)
    reason = f" ({first_line(e)})" if e is not None else ""
    return not_found(spec, where=f"the torch hub cache {path!r} (TORCH_HOME={os.environ.get('TORCH_HOME')!r})",
                      reason=reason, download=True,
                      how=f"download {weights.url} on a connected machine and copy it to {path!r} "
                          "(or point TORCH_HOME at a folder holding hub/checkpoints/).")


# -- CLIP (open_clip) ------------------------------------------------------------------------------
class ClipEncoder(Encoder):
    """An open_clip CLIP model: images through ``model.visual`` (as ``Encoder``), text through
    ``encode_text``. Features are raw embeddings unless ``normalize=True`` (then both are L2-normalised).
    """

    def __init__(self, clip_model: nn.Module, tokenizer, layer: str | None = None, *, normalize: bool = False,
                 **kw):
        super().__init__(clip_model.visual, layer, **kw)
        self.clip = clip_model.eval().requires_grad_(False)  # shares `visual` with self.model
        self.tokenizer = tokenizer
        self.normalize = bool(normalize)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        f = super().forward(img)
        return F.normalize(f, dim=-1) if self.normalize else f

    def encode_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Text embeddings (B, D) of ``prompts`` (the CLIP text tower's output)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        p = next(self.clip.parameters())
        tokens = self.tokenizer(prompts).to(p.device)
        return self.clip.encode_text(tokens, normalize=self.normalize).float()


@register_encoder("clip")
def clip_encoder(name: str, layer: str | None = None, *, pool: str | None = None, quantize: bool = False,
                 interpolation: str | None = None, call: int | None = None, pretrained: str | None = None,
                 normalize: bool = False, model_kwargs: dict | None = None,
                 cache_dir: str | None = None) -> ClipEncoder:
    """``clip:<model>[/<pretrained tag or file>][@layer]``; default: the image embedding."""
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        model_name, tag = name, None
    else:
        model_name, _, tag = name.partition("/")
    tag = pretrained if pretrained is not None else (tag or None)
    spec = f"clip:{model_name}" + (f"/{tag}" if tag else "")
    if not name.startswith(("hf-hub:", "local-dir:")) and model_name not in open_clip.list_models():
        raise KeyError(f"unknown open_clip model {model_name!r}.{suggest(model_name, open_clip.list_models())}")
    extra = dict(model_kwargs or {})
    if cache_dir:
        extra["cache_dir"] = cache_dir
    try:
        model = open_clip.create_model(model_name, pretrained=tag, **extra)
    except (OSError, RuntimeError) as e:
        raise _clip_error(model_name, tag, spec, e) from e
    tokenizer = open_clip.get_tokenizer(model_name)
    pcfg = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    size = _hw(pcfg.get("size") or getattr(model.visual, "image_size", 224))
    mean = tuple(pcfg.get("mean") or getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(pcfg.get("std") or getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    label = "embedding" if layer is None or layer in ("embedding", *OUTPUT) else layer
    layer = None if label == "embedding" else layer
    return ClipEncoder(model, tokenizer, layer, normalize=bool(normalize), input_size=size, in_chans=3, mean=mean,
                       std=std, pool=_pool(pool, label, spec), quantize=bool(quantize), call=call,
                       name=f"{spec}@{label}",
                       interpolation=_interp_name(interpolation or pcfg.get("interpolation", "bicubic")))


def _clip_error(model_name: str, tag: str | None, spec: str, e: Exception) -> Exception:
    import open_clip

    msg = str(e)
    looks_like_file = tag is not None and (os.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors")))
    if "not a known tag" in msg and not looks_like_file:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        return KeyError(f"unknown open_clip pretrained tag {tag!r} for {model_name!r}; known: {tags}."
                        f"{suggest(str(tag), tags)}")
    if looks_like_file and not os.path.exists(tag):
        return not_found(spec, where=f"the file {tag!r}", reason=f" ({first_line(e)})",
                          how=f"give an existing open_clip checkpoint file: `clip:{model_name}//path/to/model.bin`.")
    if tag is not None and not looks_like_file and (
            isinstance(e, OSError) or any(s in msg for s in ("download", "Download", "not found"))):
        hub = (open_clip.get_pretrained_cfg(model_name, tag) or {}).get("hf_hub") if tag else None
        return missing_weights(hub.rstrip("/") if hub else spec, detail=(
            f"open_clip {model_name!r} weights {tag!r} ({spec}): {first_line(e)}. Alternatively pass a "
            f"local checkpoint file: `clip:{model_name}//path/to/open_clip_model.bin`."))
    return e
