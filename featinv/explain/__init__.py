"""Model-level explainers built on featinv's diffusion machinery and its worlds (seed systems 001-004).

EDDP (seed 001, arXiv 2509.23926), directions in a layer and their evaluation:

* ``eddp``: ``fit_eddp`` -> ``DirectionPairs`` (decoding directions W, thresholds b, signal vectors S);
* ``losses`` / ``auglag``: the paper's losses and the augmented-Lagrangian helper;
* ``influence``: RCAV-style influence of directions on classes (permutation test, SDC / SCDP);
* ``dissection``: IoU of detector maps with concept masks, S^1 / S^2;
* ``synthetic`` / ``recovery`` / ``baselines``: the paper's synthetic world, scoring against its ground truth,
  and PCA / NMF / FastICA / sparse-autoencoder / Pattern-CAV baselines;
* a conv layer of a classifier in a world with pixel-labelled concepts (the shapes world): ``layer``
  (f- / f+ split), ``concepts`` (masks, Network Dissection), ``counterfactual``, ``am`` (validation by
  activation maximisation), ``layer_baselines``, ``eddp_world`` (``explain_layer``: the whole pipeline);
  ``eddp_shapes`` is the glue to the shapes world (``explain_classifier``, ``validate``);
* ``eddp_module``: ``EDDPModule``, the Lightning layer (``featinv predict -c configs/explain/eddp.yaml``).

Concept importance through text-conditioned diffusion (seeds 003, 004):

* ``depict``: DEPICT (Jabbour et al., ECCV 2024) -- permutation importance of concepts through a
  text-conditioned generator; ``gradcam``: its pixel-attribution baseline (Captum Grad-CAM pooled
  over concept masks);
* ``diffex``: DiffEx (Kazimi et al., CVPR 2025) -- hierarchical semantics scored by text-guided edits;
  ``ledits``: the LEDITS++ editor of diffusers, inverted once and reused across keywords;
* ``shapes_oracles``: the shapes world's oracles, judges and target classifiers wired to both;
* ``modules``: their Lightning layer (``DepictModule``, ``DiffExModule``) -- the only module here that
  reaches Lightning.

DiffExplainer (arXiv 2404.02618) and DEXTER (arXiv 2510.14741):

* ``unrolled``: a few-step DDIM sampler unrolled with gradients to the conditioning;
* ``prompt``: template slots -> the prior's text encoder (one-hot x translation x token embeddings, soft tokens);
* ``mlm``: a word-level masked LM with a soft prompt; ``dexter``: DEXTER's optimisation (``run_dexter``);
* ``diffexplainer``: soft-token optimisation (``run_diffexplainer``); ``score``: targets and the activation score;
* ``reporter``: the deterministic stand-in for DEXTER's VLM/LLM report; ``shapes``: the shapes world's grammar.

Plain PyTorch (no Lightning / W&B) everywhere but ``eddp_module``, ``modules`` and ``dexter_module``.
"""
from featinv.explain.dissection import dissection_iou, s1_score, s2_score
from featinv.explain.eddp import PRESETS, DirectionPairs, EDDPConfig, fit_eddp
from featinv.explain.eddp_world import LayerConfig, LayerReport, WorldData, explain_layer
from featinv.explain.influence import Influence, rcav_influence
from featinv.explain.layer import LayerSplit

__all__ = ["fit_eddp", "EDDPConfig", "DirectionPairs", "PRESETS", "rcav_influence", "Influence",
           "dissection_iou", "s1_score", "s2_score", "explain_layer", "LayerConfig", "LayerReport", "WorldData",
           "LayerSplit"]
