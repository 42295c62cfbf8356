"""Model-level explainers built on featinv's diffusion machinery (seed systems 001-004).

* ``depict``: DEPICT (Jabbour et al., ECCV 2024) -- permutation importance of concepts through a
  text-conditioned generator; ``gradcam``: its pixel-attribution baseline (Captum Grad-CAM pooled
  over concept masks);
* ``diffex``: DiffEx (Kazimi et al., CVPR 2025) -- hierarchical semantics scored by text-guided edits
  (``ledits``: the LEDITS++ editor of diffusers, inverted once and reused across keywords);
* ``shapes_oracles``: the shapes world's oracles, judges and target classifiers wired to both;
* ``modules``: the Lightning layer (``DepictModule``, ``DiffExModule``) -- the only module here that
  imports Lightning.
"""
