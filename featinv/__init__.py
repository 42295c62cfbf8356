"""featinv: what does this encoder's feature encode? Feature inversion with guided diffusion
(Shirahama et al., 2025) and activation-maximisation baselines, in a Lightning harness."""
from featinv.api import InversionResult, invert, target_seed
from featinv.encoders import Encoder, list_layers
from featinv.guidance import Guidance
from featinv.methods import get_method, list_methods, make_method
from featinv.priors import LatentPrior, PixelPrior, Prior
from featinv.specs import build_encoder, build_prior

__all__ = ["invert", "InversionResult", "target_seed", "Encoder", "build_encoder", "list_layers",
           "Guidance", "get_method", "list_methods", "make_method", "Prior", "PixelPrior", "LatentPrior",
           "build_prior"]
__version__ = "0.1.0"
