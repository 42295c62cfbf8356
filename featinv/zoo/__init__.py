"""The embedded default: a digits diffusion prior and two digits classifiers trained in this repo.

Specs: prior ``zoo:digits-ddpm``; encoders ``zoo:digits-cnn[@layer]`` (default layer
``penultimate``, 64-d) and ``zoo:digits-vit[@layer]`` (default: the CLS embedding).
Weights are safetensors under ``featinv/zoo/weights``; ``python -m featinv.zoo.train`` rebuilds them.
The shapes world (``featinv.zoo.shapes``) adds ``zoo:shapes-sd``, ``zoo:shapes-multi-sd`` and the
``zoo:shapes-*`` encoders.
"""
from __future__ import annotations

from featinv.encoders import Encoder, register_encoder
from featinv.priors import PixelPrior, register_prior

ZOO_ENCODERS = ("digits-cnn", "digits-vit")


@register_prior("zoo")
def zoo_prior(name: str, _layer=None, path=None, **kw) -> PixelPrior:
    from featinv.zoo import digits

    if name.startswith("shapes-"):  # the shapes world: a latent (Stable Diffusion layout) prior
        from featinv.zoo import shapes

        return shapes.load_prior(name, **kw)

    if name != "digits-ddpm":
        raise KeyError(f"unknown zoo prior {name!r}; the zoo has: 'digits-ddpm'")
    unet, sched = digits.load_digits_ddpm(path)
    return PixelPrior(unet, sched)


@register_encoder("zoo")
def zoo_encoder(name: str, layer: str | None = None, path=None, quantize: bool = False, **_) -> Encoder:
    from featinv.zoo import digits

    if name.startswith("shapes-"):
        from featinv.zoo import shapes

        return shapes.load_encoder(name, layer, quantize=quantize)

    if name == "digits-cnn":
        model, default = digits.load_digits_cnn(path), "penultimate"
    elif name == "digits-vit":
        model, default = digits.load_digits_vit(path), digits.VIT_FEATURE_LAYER
    else:
        raise KeyError(f"unknown zoo encoder {name!r}; the zoo has: {', '.join(ZOO_ENCODERS)}")
    layer = default if layer is None else (None if layer in ("logits", "output") else layer)
    return Encoder(model, layer, input_size=digits.IMAGE_SIZE, in_chans=1, quantize=quantize,
                   name=f"zoo:{name}@{layer or 'logits'}")
