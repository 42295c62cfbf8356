"""Explaining a network: EDDP's directions in a layer (seed 001) and DiffExplainer / DEXTER's prompts (seed 002).

EDDP (arXiv 2509.23926) and its evaluation:

* ``eddp``: ``fit_eddp`` -> ``DirectionPairs`` (decoding directions W, thresholds b, signal vectors S);
* ``losses`` / ``auglag``: the paper's losses and the augmented-Lagrangian helper;
* ``influence``: RCAV-style influence of directions on classes (permutation test, SDC / SCDP);
* ``dissection``: IoU of detector maps with concept masks, S^1 / S^2;
* ``synthetic`` / ``recovery`` / ``baselines``: the paper's synthetic world, scoring against its ground truth,
  and PCA / NMF / FastICA / sparse-autoencoder / Pattern-CAV baselines.

DiffExplainer (arXiv 2404.02618) and DEXTER (arXiv 2510.14741):

* ``unrolled``: a few-step DDIM sampler unrolled with gradients to the conditioning;
* ``prompt``: template slots -> the prior's text encoder (one-hot x translation x token embeddings, soft tokens);
* ``mlm``: a word-level masked LM with a soft prompt; ``dexter``: DEXTER's optimisation (``run_dexter``);
* ``diffexplainer``: soft-token optimisation (``run_diffexplainer``); ``score``: targets and the activation score;
* ``reporter``: the deterministic stand-in for DEXTER's VLM/LLM report; ``shapes``: the shapes world's grammar.

Plain PyTorch (no Lightning / W&B), except ``dexter_module`` (``featinv predict``).
"""
from featinv.explain.dissection import dissection_iou, s1_score, s2_score
from featinv.explain.eddp import PRESETS, DirectionPairs, EDDPConfig, fit_eddp
from featinv.explain.influence import Influence, rcav_influence

__all__ = ["fit_eddp", "EDDPConfig", "DirectionPairs", "PRESETS", "rcav_influence", "Influence",
           "dissection_iou", "s1_score", "s2_score"]
