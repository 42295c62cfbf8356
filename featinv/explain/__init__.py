"""Model-level explainers built on featinv's priors and objectives (EDDP, DiffExplainer / DEXTER, ...).

Each explainer's core is plain PyTorch; its Lightning module (``*_module.py``) runs it through
``featinv predict``. See the modules for the papers and steps they implement.
"""
