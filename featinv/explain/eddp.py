"""EDDP: learning encoding-decoding direction pairs in a layer (Doumanoglou, Driessens, Zarpalas,
arXiv 2509.23926), plain PyTorch.

Data model: each spatial activation of a layer is x_p = S alpha_p + D beta_p (+ mu): concept signal values
alpha_p written along encoding directions (columns of S), distractors beta_p along D. A concept is read back
by a decoding direction w_i (a filter: w_i^T s_i = 1, w_i orthogonal to the other s_j and to D) with a
threshold b_i; EDDP learns the pairs (w_i, b_i) and estimates s_i, without labels:

  (a) directional clustering (as in CBE): detectors y_p = sigma(W^T x_p - b) on standardised activations,
      W = orthonormal directions times a per-detector scale;
      min lambda_s L^s + lambda_uur L^uur   s.t.  L^ma < 0.8, L^mm < 8, L^ic < 0.1   (augmented Lagrangian);
  (b) the same with orthogonality and standardisation dropped (free W, b on the raw activations), plus the
      excessively-active-classifier loss L^eac and the sparsity bound L^sb, both reduced with R_SW;
  (c) signal vectors s_i = cov[x, z_i] / var z_i on the positives of detector i (``losses.signal_vectors``);
  (d) W, b, S jointly: min lambda_s L^s + lambda_sb L^sb + lambda_cur L^cur
      s.t. L^ma, L^mm, L^ic, L^eac < bounds and L^fso < 0.1 (augmented Lagrangian).

The uncertainty-region losses need ``f_plus``, the rest of the network from the layer on, applied to
activations (N, P, D); without it they are left out. Loss definitions: ``featinv.explain.losses``.

Choices where the paper (as we have it) is silent, all configurable in ``EDDPConfig``:
* "standardisation" in (a) = z-scoring every channel over all positions; "orthogonality" = orthonormal
  filter directions (symmetric orthonormalisation of a free matrix) times a learned per-detector scale;
* step (b) is also solved with the augmented Lagrangian (objective lambda_s L^s + lambda_sb L^sb
  + lambda_uur L^uur; constraints L^ma, L^mm, L^ic, R_SW(L^eac));
* the paper's "20,000 epochs" is taken per optimised step ((a), (b) and (d));
* steps (b), (d) parametrise w_i = exp(k_i) u_i / ||u_i|| and b = c + W^T mean(x), and (d) optimises unit
  directions for s_i: the same functions as free W, b, S, but Adam's per-coordinate steps then change
  sharpness on a log scale and do not swing W^T x through a large mean activation;
* L^mm is measured on the parameters of the current step (standardised space in (a), raw space after);
* after (d) every s_i is rescaled so that w_i^T s_i = 1 (L^cur and L^fso are blind to the scale of s_i);
* the detectors of (a) start from random orthonormal directions with thresholds at the (1 - 1/I) quantile
  of their projections, so that each starts firing on about 1/I of the positions;
* multipliers are updated once per epoch from the epoch's mean constraint values;
* step (a) is non-convex (a clustering); ``restarts_a`` > 1 runs it from several random starts and keeps
  the one with the lowest final loss (objective + augmented-Lagrangian penalty), as k-means' n_init does.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from featinv.explain import losses as L
from featinv.explain.auglag import AugmentedLagrangian

FPlus = Callable[[Tensor], Tensor]


@dataclass
class EDDPConfig:
    """Hyper-parameters. Defaults: the paper's synthetic setting (lr 5e-5, 20,000 epochs, gamma 1.1, tau 1,
    rho 1.5/3, nu 4, the constraint bounds). Objective weights are not given for the synthetic setting: 1."""
    epochs_a: int = 20000
    epochs_b: int = 20000
    epochs_d: int = 20000
    lr_a: float = 5e-5
    lr_b: float = 5e-5
    lr_d: float = 5e-5
    batch_size: Optional[int] = None  # images per step; None = all images in one step
    gamma: float = 1.1
    tau_a: float = 1.0
    tau_b: float = 1.0
    tau_d: float = 1.0
    rho_b: float = 0.5
    rho_d: float = 0.5
    nu_sw: float = 4.0
    lambda_s: float = 1.0
    lambda_uur: float = 1.0
    lambda_sb: float = 1.0
    lambda_cur: float = 1.0
    bound_ma: float = 0.8
    bound_mm: float = 8.0
    bound_ic: float = 0.1
    bound_eac: float = 0.1
    bound_fso: float = 0.1
    al_mu: float = 1.0
    restarts_a: int = 1  # step (a) from this many random starts; the lowest final loss is kept
    positive_threshold: float = 0.5
    f_plus_output: str = "logits"  # what f_plus returns: "logits" or "probs"
    log_every: int = 100  # epochs between history entries (the last epoch is always logged)

    def summary(self) -> str:
        """The schedule and the hyper-parameters that differ from the paper's synthetic setting."""
        diff = {k: v for k, v in asdict(self).items() if v != getattr(EDDPConfig, k, v) and k != "log_every"}
        return ", ".join(f"{k}={v}" for k, v in diff.items()) or "the paper's synthetic setting"


@dataclass
class DirectionPairs:
    """Learned pairs: W (D, I) decoding directions, b (I,) thresholds, S (D, I) encoding directions."""
    W: Tensor
    b: Tensor
    S: Tensor
    history: dict = field(default_factory=dict)

    @property
    def n_directions(self) -> int:
        return self.W.shape[1]

    def detect(self, x: Tensor) -> Tensor:
        """Concept detector outputs y = sigma(W^T x - b), (..., D) -> (..., I)."""
        return L.detector_outputs(x, self.W, self.b)

    def signal_values(self, x: Tensor, origin: Optional[Tensor] = None) -> Tensor:
        """Signal values in units of s_i, (..., D) -> (..., I); a_i ||s_i|| is the same in units of a unit
        encoding direction.

        Without ``origin``: a = (W^T S)^+ (W^T x - b), relative to the detectors' thresholds (a_i > 0 where
        detector i fires; x - S a lies on every detector hyperplane, the constrained uncertainty region).
        With ``origin`` (a point where every signal value is 0, e.g. a known activation offset):
        a = (W^T S)^+ W^T (x - origin). (W^T S)^+ undoes what each filter reads of the other signals."""
        if origin is None:
            return (x @ self.W - self.b) @ torch.linalg.pinv(self.W.T @ self.S).T
        return ((x - origin) @ self.W) @ torch.linalg.pinv(self.W.T @ self.S).T

    def project(self, x: Tensor) -> Tensor:
        """x - S a: x moved along the signal vectors onto the intersection of the detector hyperplanes (the
        constrained uncertainty region of L^cur)."""
        return x - self.signal_values(x) @ self.S.T

    def intervene(self, x: Tensor, i: int, delta: float) -> Tensor:
        """x + delta s_i: raise concept i's signal value by delta (counterfactual / RCAV perturbation)."""
        return x + delta * self.S[:, i]

    def state_dict(self) -> dict:
        return {"W": self.W, "b": self.b, "S": self.S, "history": self.history}

    @classmethod
    def from_state_dict(cls, state: dict) -> "DirectionPairs":
        return cls(state["W"], state["b"], state["S"], state.get("history", {}))


# The paper's synthetic schedule, and the faster one used by benchmarks/eddp.py, chosen on validation worlds
# (seeds 100-103, not among the reported seeds; see benchmarks/results/eddp.md). "paper": full-batch steps,
# so 20,000 epochs = 20,000 Adam steps per step of the method (~6 min on one CPU core, synthetic world).
# "fast": larger learning rates, fewer epochs, two starts of step (a), L^mm bound 32 (with M_i = 1/||w_i||),
# and the uncertainty-loss weights of the paper's real setting (lambda_uur = lambda_cur = 0.25). The synthetic
# benchmark replaces that weight with the one chosen on validation worlds 100-119 (0.05,
# benchmarks/results/eddp_synthetic_val.md); the shapes part keeps 0.25.
PRESETS = {
    "paper": EDDPConfig(),
    "fast": EDDPConfig(epochs_a=2000, epochs_b=1000, epochs_d=2000, lr_a=1e-2, lr_b=3e-2, lr_d=1e-3,
                       bound_mm=32.0, restarts_a=2, lambda_uur=0.25, lambda_cur=0.25),
    # a reduced run for tests / CI (300 images per class is enough for it)
    "smoke": EDDPConfig(epochs_a=500, epochs_b=500, epochs_d=200, lr_a=1e-2, lr_b=3e-2, lr_d=1e-3,
                        bound_mm=32.0, restarts_a=2, lambda_uur=0.25, lambda_cur=0.25, log_every=50),
}


def _sym_orthonormal(V: Tensor) -> Tensor:
    """V (V^T V)^{-1/2}: the orthonormal matrix nearest to V (columns), differentiable."""
    evals, evecs = torch.linalg.eigh(V.T @ V)
    return V @ (evecs * evals.clamp_min(1e-12).rsqrt()) @ evecs.T


def _batches(n: int, batch_size: Optional[int], gen: torch.Generator):
    if batch_size is None or batch_size >= n:
        yield None
        return
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


def _run_stage(name: str, X: Tensor, params: list, step_fn, bounds: dict, epochs: int, lr: float,
               cfg: EDDPConfig, gen: torch.Generator, log: list, callback) -> float:
    """Adam on objective + augmented-Lagrangian penalty; ``step_fn(X_batch) -> (objective, constraints,
    extra_logs)``; multipliers updated once per epoch from the epoch's mean constraint values. Appends
    history entries to ``log``; returns the last epoch's mean loss (objective + penalty)."""
    al = AugmentedLagrangian(bounds, mu=cfg.al_mu)
    opt = torch.optim.Adam(params, lr=lr)
    if epochs <= 0:
        return float("nan")
    t0 = time.perf_counter()
    for epoch in range(epochs):
        sums, n_steps = {}, 0
        for idx in _batches(X.shape[0], cfg.batch_size, gen):
            objective, cons, extra = step_fn(X if idx is None else X[idx])
            loss = objective + al.penalty(cons)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n_steps += 1
            for k, v in {"loss": loss, "objective": objective, **cons, **extra}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        means = {k: v / n_steps for k, v in sums.items()}
        al.update(means)
        if epoch % cfg.log_every == 0 or epoch == epochs - 1:
            entry = {"epoch": epoch, **means, **{f"lambda_{k}": v for k, v in al.multipliers.items()},
                     "seconds": time.perf_counter() - t0}
            log.append(entry)
            if callback is not None:
                callback(name, epoch, entry)
    return means["loss"]


def fit_eddp(X: Tensor, f_plus: Optional[FPlus] = None, n_directions: int = 3,
             config: Optional[EDDPConfig] = None, seed: int = 0,
             generator: Optional[torch.Generator] = None, callback=None) -> DirectionPairs:
    """Learn ``n_directions`` encoding-decoding direction pairs from activations X (N, P, D).

    ``f_plus`` maps (N, P, D) activations to (N, classes) logits (or probabilities, see
    ``config.f_plus_output``); it is used only by the uncertainty-region losses and may be None. Its own
    parameters are never updated (freeze them, ``requires_grad_(False)``, to spare their gradients).
    ``callback(stage, epoch, log_entry)`` is called at every history entry. Returns ``DirectionPairs``
    whose ``history`` holds, per stage, the logged losses, constraint values and multipliers."""
    cfg = config or EDDPConfig()
    if X.dim() != 3:
        raise ValueError(f"X must be (N, P, D), got {tuple(X.shape)}")
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    X = X.detach().float()
    N, P, Dm = X.shape
    I = n_directions
    if not 1 <= I <= Dm:
        raise ValueError(f"n_directions must be in [1, D={Dm}] (step (a) uses orthonormal directions), got {I}")
    flat = X.reshape(-1, Dm)
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    history: dict = {"config": asdict(cfg), "seconds": {}}
    use_net = f_plus is not None

    def uncertainty(x_prime: Tensor) -> Tensor:
        return L.uncertainty_loss(f_plus, x_prime, cfg.f_plus_output)

    # ---- step (a): orthonormal directions on standardised activations ----------------------------------
    def stage_a(run: int):
        V = torch.randn(Dm, I, generator=gen)
        with torch.no_grad():
            proj = ((flat - mean) / std) @ _sym_orthonormal(V)
            b0 = torch.quantile(proj[torch.randperm(len(proj), generator=gen)[:100000]], 1 - 1 / I, dim=0)
        V.requires_grad_(True)
        log_k = torch.zeros(I, requires_grad=True)
        b_t = b0.clone().requires_grad_(True)

        def raw_params():
            W_t = _sym_orthonormal(V) * log_k.exp()  # standardised-space filters
            W = W_t / std[:, None]                    # w^T (x - m)/s - b_t == (w/s)^T x - (b_t + (w/s)^T m)
            return W_t, W, b_t + mean @ W

        def step_a(Xb):
            W_t, W, b = raw_params()
            y = L.detector_outputs(Xb.reshape(-1, Dm), W, b)
            s = L.sparsity_loss(y)
            obj, extra = cfg.lambda_s * s, {"s": s.detach()}
            if use_net:
                uur = uncertainty(L.uncertainty_region_points(Xb, W, b))
                obj = obj + cfg.lambda_uur * uur
                extra["uur"] = uur.detach()
            cons = {"ma": L.max_activation_loss(y), "mm": L.max_margin_loss(W_t),
                    "ic": L.inactive_classifier_loss(y, cfg.tau_a, cfg.gamma)}
            return obj, cons, extra

        log: list = []
        final = _run_stage("a" if cfg.restarts_a == 1 else f"a{run}", X, [V, log_k, b_t], step_a,
                           {"ma": cfg.bound_ma, "mm": cfg.bound_mm, "ic": cfg.bound_ic}, cfg.epochs_a, cfg.lr_a,
                           cfg, gen, log, callback)
        with torch.no_grad():
            _, W0, b0 = raw_params()
        return final, W0, b0, log

    t = time.perf_counter()
    runs = [stage_a(r) for r in range(cfg.restarts_a)]
    best = min(range(len(runs)), key=lambda r: runs[r][0] if math.isfinite(runs[r][0]) else math.inf)
    _, W0, b0, history["a"] = runs[best]
    history["a_restarts"] = {"final_loss": [r[0] for r in runs], "chosen": best}
    history["seconds"]["a"] = time.perf_counter() - t
    # Steps (b), (d) act on the raw activations. Parametrisation (same functions, better conditioned):
    # w_i = exp(k_i) u_i / ||u_i|| (sharpness on a log scale) and b = c + W^T m with m the mean activation,
    # so that Adam's per-coordinate steps on W neither crawl in sharpness nor swing W^T x through the mean
    # offset (the synthetic activations sit around +10).
    Wdir = W0.clone().requires_grad_(True)
    log_k = W0.norm(dim=0).log().clone().requires_grad_(True)
    c = (b0 - mean @ W0).clone().requires_grad_(True)

    def filters():
        W = Wdir / Wdir.norm(dim=0) * log_k.exp()
        return W, c + mean @ W

    # ---- step (b): free W, b on raw activations; + L^eac, L^sb (R_SW) ------------------------------------
    def common(Xb, tau, rho):
        W, b = filters()
        y = L.detector_outputs(Xb.reshape(-1, Dm), W, b)
        sb = L.self_weighted_softmax(L.sparsity_bound_loss(y), cfg.nu_sw)
        s = L.sparsity_loss(y)
        obj = cfg.lambda_s * s + cfg.lambda_sb * sb
        cons = {"ma": L.max_activation_loss(y), "mm": L.max_margin_loss(W),
                "ic": L.inactive_classifier_loss(y, tau, cfg.gamma),
                "eac": L.self_weighted_softmax(L.excessively_active_loss(y, rho, cfg.gamma), cfg.nu_sw)}
        return obj, W, b, cons, {"s": s.detach(), "sb": sb.detach()}

    def step_b(Xb):
        obj, W, b, cons, extra = common(Xb, cfg.tau_b, cfg.rho_b)
        if use_net:
            uur = uncertainty(L.uncertainty_region_points(Xb, W, b))
            obj = obj + cfg.lambda_uur * uur
            extra["uur"] = uur.detach()
        return obj, cons, extra

    bounds_b = {"ma": cfg.bound_ma, "mm": cfg.bound_mm, "ic": cfg.bound_ic, "eac": cfg.bound_eac}
    t = time.perf_counter()
    _run_stage("b", X, [Wdir, log_k, c], step_b, bounds_b, cfg.epochs_b, cfg.lr_b, cfg, gen,
               history.setdefault("b", []), callback)
    history["seconds"]["b"] = time.perf_counter() - t

    # ---- step (c): signal vectors on the positives -------------------------------------------------------
    with torch.no_grad():
        S0 = L.signal_vectors(flat, *filters(), cfg.positive_threshold)
    history["S_init"] = S0.clone()
    # L^cur and L^fso do not depend on the length of s_i: optimise unit directions (lengths restored below).
    U = (S0 / S0.norm(dim=0).clamp_min(1e-12)).requires_grad_(True)

    # ---- step (d): W, b, S jointly; L^cur and L^fso -----------------------------------------------------
    def step_d(Xb):
        obj, W, b, cons, extra = common(Xb, cfg.tau_d, cfg.rho_d)
        S = U / U.norm(dim=0)
        if use_net:
            cur = uncertainty(L.constrained_uncertainty_points(Xb, W, b, S))
            obj = obj + cfg.lambda_cur * cur
            extra["cur"] = cur.detach()
        cons["fso"] = L.filter_signal_orthogonality(W, S)
        return obj, cons, extra

    t = time.perf_counter()
    _run_stage("d", X, [Wdir, log_k, c, U], step_d, {**bounds_b, "fso": cfg.bound_fso}, cfg.epochs_d, cfg.lr_d, cfg,
               gen, history.setdefault("d", []), callback)
    history["seconds"]["d"] = time.perf_counter() - t

    with torch.no_grad():
        W_f, b_f = (t.detach().clone() for t in filters())
        S_f = U.detach().clone()
        scale = (W_f * S_f).sum(0)  # w_i^T s_i
        S_f = S_f / torch.where(scale.abs() > 1e-8, scale, torch.ones_like(scale))
    if not all(math.isfinite(float(v)) for v in torch.cat([W_f.flatten(), b_f, S_f.flatten()])):
        raise FloatingPointError("EDDP diverged (non-finite parameters); lower the learning rates")
    return DirectionPairs(W_f, b_f, S_f, history)
