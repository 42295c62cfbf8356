"""The embedded worlds: models trained in this repository, named by ``zoo:`` specs.

Digits world: prior ``zoo:digits-ddpm``; encoders ``zoo:digits-cnn[@layer]`` (default layer
``penultimate``, 64-d) and ``zoo:digits-vit[@layer]`` (default: the CLS embedding); ``@logits``
gives class scores. Options as for every family: ``zoo:digits-cnn?quantize=true&path=<weights>``.
Weights are safetensors under ``featinv/zoo/weights``; ``python -m featinv.zoo.train`` rebuilds them.
"""
from __future__ import annotations

from featinv.encoders import Encoder
from featinv.priors import PixelPrior
from featinv.specs import register_encoder, register_prior, suggest

ZOO_PRIORS = ("digits-ddpm",)
ZOO_ENCODERS = ("digits-cnn", "digits-vit")


@register_prior("zoo")
def zoo_prior(name: str, layer=None, *, path: str | None = None) -> PixelPrior:
    """``zoo:digits-ddpm``."""
    from featinv.zoo import digits

    if name != "digits-ddpm":
        raise KeyError(f"unknown zoo prior {name!r}; the zoo has: {', '.join(ZOO_PRIORS)}.{suggest(name, ZOO_PRIORS)}")
    unet, sched = digits.load_digits_ddpm(path)
    return PixelPrior(unet, sched)


@register_encoder("zoo")
def zoo_encoder(name: str, layer: str | None = None, *, path: str | None = None, quantize: bool = False,
                pool: str | None = None, call: int | None = None) -> Encoder:
    """``zoo:digits-cnn[@layer]``, ``zoo:digits-vit[@layer]``; ``@logits`` = the class scores."""
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
