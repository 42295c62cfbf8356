"""featinv: what does this encoder's feature encode? Feature inversion with guided diffusion
(Shirahama et al., 2025) and activation-maximisation baselines, in a Lightning harness."""
from featinv.api import InversionResult, invert, target_seed
from featinv.encoders import Encoder, build_encoder, list_layers
from featinv.guidance import Guidance, get_method, list_methods
from featinv.priors import LatentPrior, PixelPrior, Prior, build_prior

__all__ = ["invert", "InversionResult", "target_seed", "Encoder", "build_encoder", "list_layers",
           "Guidance", "get_method", "list_methods", "Prior", "PixelPrior", "LatentPrior", "build_prior"]
__version__ = "0.1.0"
