"""The embedded worlds: models trained in this repository, named by ``zoo:`` specs.

Digits world: prior ``zoo:digits-ddpm``; encoders ``zoo:digits-cnn[@layer]`` (default layer
``penultimate``, 64-d) and ``zoo:digits-vit[@layer]`` (default: the CLS embedding); ``@logits``
gives class scores. Options as for every family: ``zoo:digits-cnn?quantize=true&path=<weights>``.

Shapes world (``featinv.zoo.shapes``): priors ``zoo:shapes-sd``, ``zoo:shapes-multi-sd`` (latent) and
``zoo:shapes-pixel`` (the pixel-space fallback) (``?prompt=...&cfg_scale=...``); encoders ``zoo:shapes-shape``, ``zoo:shapes-color``,
``zoo:shapes-invariant``, ``zoo:shapes-clip`` (``?normalize=true``) and
``zoo:shapes-target-<name>``; the judges ``zoo:shapes-reader`` and ``zoo:shapes-detector``
(evaluators: ``read(images) -> {factor: (value, confidence)}``).
Weights are safetensors under ``featinv/zoo/weights``; ``python -m featinv.zoo.train`` rebuilds them.
"""
from __future__ import annotations

from featinv.encoders import Encoder
from featinv.priors import PixelPrior, Prior
from featinv.specs import register_encoder, register_prior, suggest

ZOO_PRIORS = ("digits-ddpm", "shapes-sd", "shapes-multi-sd", "shapes-pixel")
ZOO_ENCODERS = ("digits-cnn", "digits-vit", "shapes-shape", "shapes-color", "shapes-invariant", "shapes-clip",
                "shapes-target-<name>", "shapes-reader", "shapes-detector")


@register_prior("zoo")
def zoo_prior(name: str, layer=None, *, path: str | None = None, prompt: str = "", negative_prompt: str = "",
              cfg_scale: float = 1.0) -> Prior:
    """``zoo:digits-ddpm``, ``zoo:shapes-sd``, ``zoo:shapes-multi-sd``, ``zoo:shapes-pixel``."""
    if name.startswith("shapes-"):  # the shapes world: latent priors in Stable Diffusion's layout, one pixel prior
        from featinv.zoo import shapes

        return shapes.load_prior(name, root=path, prompt=prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale)
    from featinv.zoo import digits

    if name != "digits-ddpm":
        raise KeyError(f"unknown zoo prior {name!r}; the zoo has: {', '.join(ZOO_PRIORS)}.{suggest(name, ZOO_PRIORS)}")
    unet, sched = digits.load_digits_ddpm(path)
    return PixelPrior(unet, sched)


@register_encoder("zoo")
def zoo_encoder(name: str, layer: str | None = None, *, path: str | None = None, quantize: bool = False,
                pool: str | None = None, call: int | None = None, normalize: bool = False):
    """``zoo:<model>[@layer]``; ``@logits`` = the class scores (see the module docstring)."""
    if name in ("shapes-reader", "shapes-detector"):
        from featinv.zoo.shapes.judges import Judge

        return Judge(name, root=path)
    if name.startswith("shapes-"):
        from featinv.zoo import shapes

        return shapes.load_encoder(name, layer, quantize=quantize, pool=pool, call=call, normalize=normalize,
                                   root=path)
    from featinv.zoo import digits

    if name == "digits-cnn":
        model, default = digits.load_digits_cnn(path), "penultimate"
    elif name == "digits-vit":
        model, default = digits.load_digits_vit(path), digits.VIT_FEATURE_LAYER
    else:
        raise KeyError(f"unknown zoo encoder {name!r}; the zoo has: {', '.join(ZOO_ENCODERS)}."
                       f"{suggest(name, ZOO_ENCODERS)}")
    layer = default if layer is None else (None if layer in ("logits", "output") else layer)
    return Encoder(model, layer, input_size=digits.IMAGE_SIZE, in_chans=1, quantize=bool(quantize), pool=pool,
                   call=call, name=f"zoo:{name}@{layer or 'logits'}")
