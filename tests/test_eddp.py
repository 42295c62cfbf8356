"""EDDP (featinv.explain): losses, augmented Lagrangian, signal vectors, dissection metrics, RCAV, the
synthetic world and a reduced synthetic run. Fast (well under a minute on one core)."""
import math

import pytest
import torch

from featinv.explain import losses as L
from featinv.explain import synthetic as syn
from featinv.explain.auglag import AugmentedLagrangian
from featinv.explain.baselines import Components
from featinv.explain.dissection import (count_above, dissection_iou, integrate, match, s1_score,
                                        s2_score)
from featinv.explain.eddp import PRESETS, DirectionPairs, EDDPConfig, fit_eddp
from featinv.explain.influence import rcav_influence
from featinv.explain.recovery import score_against_truth

torch.set_num_threads(1)


# -- losses --------------------------------------------------------------------------------------------
def test_max_activation_and_sparsity_prefer_one_hot():
    one_hot = torch.tensor([[0.98, 0.01, 0.01], [0.02, 0.97, 0.01]])
    uniform = torch.full((2, 3), 0.5)
    assert L.max_activation_loss(one_hot) < 0.25 < L.max_activation_loss(uniform)
    assert L.max_activation_loss(uniform) == pytest.approx(1.0, abs=1e-5)  # -log2(0.5)
    assert L.sparsity_loss(one_hot) < 0.25
    assert L.sparsity_loss(uniform) == pytest.approx(math.log2(3), abs=1e-4)
    # all detectors equally low is not "max-activated" either
    assert L.max_activation_loss(torch.full((2, 3), 0.05)) > L.max_activation_loss(uniform)


def test_activity_losses_and_margin():
    I = 4
    y = torch.zeros(100, I)
    y[:25, 0] = 1          # detector 0 fires on 1/4 of the positions: exactly tau/I for tau = 1
    y[:, 1] = 1            # detector 1 fires everywhere: excessively active
    # detectors 2, 3 never fire: inactive, each contributes 1 to the mean
    assert L.inactive_classifier_loss(y, tau=1.0, gamma=1.1) == pytest.approx(0.5)
    eac = L.excessively_active_loss(y, rho=0.5, gamma=1.1)
    assert eac.tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    W = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    assert L.max_margin_loss(W) == pytest.approx((5.0 + 1.0) / 2)


def test_self_weighted_softmax_between_mean_and_max():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.rand(7, generator=g) * 3
        r = L.self_weighted_softmax(x, nu=4)
        assert x.mean() - 1e-6 <= r <= x.max() + 1e-6
    x = torch.tensor([0.1, 0.2, 2.0])
    assert L.self_weighted_softmax(x, nu=0) == pytest.approx(float(x.mean()), rel=1e-5)
    assert L.self_weighted_softmax(x, nu=4) > 0.9 * 2.0 > x.mean()
    assert float(L.self_weighted_softmax(torch.zeros(3))) == 0.0


def test_uncertainty_region_points_lie_on_all_hyperplanes():
    g = torch.Generator().manual_seed(1)
    W, b = torch.randn(16, 3, generator=g), torch.randn(3, generator=g)
    S = W + 0.5 * torch.randn(16, 3, generator=g)   # signal vectors roughly along the filters
    x = torch.randn(5, 2, 16, generator=g) * 3
    xu = L.uncertainty_region_points(x, W, b)
    assert torch.allclose(xu @ W - b, torch.zeros(5, 2, 3), atol=1e-4)
    # the unconstrained move is the shortest one: within span(W)
    Q, _ = torch.linalg.qr(W)
    dx = x - xu
    assert torch.allclose(dx - dx @ Q @ Q.T, torch.zeros_like(dx), atol=1e-4)
    xc = L.constrained_uncertainty_points(x, W, b, S)
    assert torch.allclose(xc @ W - b, torch.zeros(5, 2, 3), atol=1e-4)
    Qs, _ = torch.linalg.qr(S)   # the constrained move is along the signal vectors only
    dx = x - xc
    assert torch.allclose(dx - dx @ Qs @ Qs.T, torch.zeros_like(dx), atol=1e-4)
    pairs = DirectionPairs(W, b, S)
    assert torch.allclose(pairs.project(x), xc, atol=1e-5)
    assert torch.allclose(pairs.signal_values(pairs.project(x)), torch.zeros(5, 2, 3), atol=1e-4)


def test_uncertainty_loss_is_minus_entropy():
    logits = torch.zeros(4, 3)  # uniform prediction: entropy log 3
    assert L.uncertainty_loss(lambda x: logits, torch.zeros(4, 2, 16)) == pytest.approx(-math.log(3), abs=1e-6)
    confident = torch.tensor([[20.0, 0, 0]]).repeat(4, 1)
    assert L.uncertainty_loss(lambda x: confident, None) > -1e-3
    assert L.uncertainty_loss(lambda x: logits.softmax(-1), None, output="probs") == pytest.approx(-math.log(3))


def test_filter_signal_orthogonality():
    eye = torch.eye(4)[:, :3]
    assert float(L.filter_signal_orthogonality(eye, 2 * eye)) == pytest.approx(0.0, abs=1e-7)
    S = eye.clone()
    S[1, 0] = 1.0  # s_0 now also lies along w_1
    assert float(L.filter_signal_orthogonality(eye, S)) == pytest.approx(math.sqrt(0.5 / 6), rel=1e-5)


# -- augmented Lagrangian ------------------------------------------------------------------------------
def test_augmented_lagrangian_multiplier_update_and_penalty():
    al = AugmentedLagrangian({"c": 1.0}, mu=2.0)
    assert al.update({"c": 1.5}) == {"c": 1.0}            # 0 + 2 * 0.5
    assert al.update({"c": 1.25}) == {"c": 1.5}           # 1 + 2 * 0.25
    assert al.update({"c": 0.0}) == {"c": 0.0}            # max(0, 1.5 - 2)
    al.multipliers["c"] = 1.0
    g = torch.tensor(1.5, requires_grad=True)             # active: lambda g + mu/2 g^2 with g = 0.5
    p = al.penalty({"c": g})
    assert float(p.detach()) == pytest.approx(1.0 * 0.5 + 0.5 * 2.0 * 0.25)
    p.backward()
    assert float(g.grad) == pytest.approx(1.0 + 2.0 * 0.5)
    al.multipliers["c"] = 0.0
    g = torch.tensor(0.2, requires_grad=True)             # satisfied with margin: no push
    al.penalty({"c": g}).backward()
    assert float(g.grad) == 0.0
    assert al.violations({"c": 0.2}) == {"c": 0.0} and al.violations({"c": 1.3})["c"] == pytest.approx(0.3)


def test_augmented_lagrangian_solves_a_constrained_problem():
    # min x^2  s.t.  1 - x <= 0  ->  x* = 1, lambda* = 2 (KKT: 2x - lambda = 0)
    x = torch.tensor(-1.0, requires_grad=True)
    al = AugmentedLagrangian({"one_minus_x": 0.0}, mu=1.0)
    opt = torch.optim.SGD([x], lr=0.05)
    for _ in range(60):
        for _ in range(50):
            loss = x ** 2 + al.penalty({"one_minus_x": 1 - x})
            opt.zero_grad(), loss.backward(), opt.step()
        al.update({"one_minus_x": float(1 - x.detach())})
    assert float(x) == pytest.approx(1.0, abs=1e-2)
    assert al.multipliers["one_minus_x"] == pytest.approx(2.0, abs=5e-2)


# -- signal vectors ------------------------------------------------------------------------------------
def test_signal_vectors_recover_planted_patterns_on_positives_only():
    g = torch.Generator().manual_seed(2)
    D, I, M = 16, 3, 3000
    S = torch.randn(D, I, generator=g)
    S /= S.norm(dim=0)
    which = torch.randint(0, I, (M,), generator=g)
    amp = 2.5 + 2.5 * torch.rand(M, generator=g)
    alpha = torch.nn.functional.one_hot(which, I) * amp[:, None]   # one concept per position, noise free
    x = alpha @ S.T + 10.0
    W = torch.linalg.pinv(S).T * 3.0                                # filters reading each concept (x3)
    b = W.T @ torch.full((D,), 10.0) + 3.0                          # fire where alpha_i > 1
    s_hat = L.signal_vectors(x, W, b, threshold=0.5)
    # the filters were scaled by 3, so the pattern in units of z is s / 3: w^T s_hat = 1
    assert torch.allclose(s_hat, S / 3.0, atol=1e-5)
    # on all positions (no positives restriction) the other concepts' anti-correlation biases the estimate
    s_all = L.signal_vectors(x, W, b - 1e6, threshold=0.5)
    assert (s_all * 3.0 - S).norm(dim=0).min() > 0.1


# -- dissection ----------------------------------------------------------------------------------------
def test_dissection_iou_s1_s2_on_a_hand_made_example():
    # 1 image, 6 positions; concepts A = {0,1,2}, B = {3,4}
    masks = torch.zeros(1, 6, 2, dtype=torch.bool)
    masks[0, :3, 0] = True
    masks[0, 3:5, 1] = True
    maps = torch.zeros(1, 6, 3, dtype=torch.bool)
    maps[0, :3, 0] = True          # detector 0 = A exactly: IoU 1
    maps[0, 1:4, 1] = True         # detector 1: {1,2,3}: IoU A 2/4, B 1/4
    maps[0, 3:6, 2] = True         # detector 2: {3,4,5}: IoU B 2/3
    iou = dissection_iou(maps, masks)
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.25], [0.0, 2 / 3]])
    assert torch.allclose(iou, expected, atol=1e-6)
    assert s1_score(iou) == pytest.approx(1 + 0.5 + 2 / 3)
    assert s2_score(iou) == pytest.approx(1 + 2 / 3)        # detectors 0 and 1 share label A
    assert count_above(iou, 0.6) == 2 and count_above(iou, 0.6, distinct=True) == 2
    assert count_above(iou, 0.4) == 3 and count_above(iou, 0.4, distinct=True) == 2
    assert integrate(iou) == pytest.approx(s1_score(iou), abs=1e-3)
    assert integrate(iou, distinct=True) == pytest.approx(s2_score(iou), abs=1e-3)
    assert match(iou) == {0: 0, 1: 2}


# -- influence -----------------------------------------------------------------------------------------
def test_rcav_flags_a_planted_influential_direction_and_not_a_null_one():
    g = torch.Generator().manual_seed(3)
    D = 8
    net = syn.PooledLinear(D, 3)
    with torch.no_grad():
        net.fc.weight.copy_(torch.randn(3, D, generator=g))
        net.fc.bias.zero_()
    Wc = net.fc.weight.detach()
    influential = Wc[0] - Wc[1]                                     # raises class 0 against class 1
    Q, _ = torch.linalg.qr(Wc.T)
    null = torch.randn(D, generator=g)
    null -= Q @ (Q.T @ null)                                        # invisible to the classifier
    S = torch.stack([influential / influential.norm(), null / null.norm()], 1)
    X = torch.randn(300, 2, D, generator=g)
    pairs = DirectionPairs(S.clone(), torch.zeros(2), S)
    with pytest.raises(ValueError):   # 60 permutations cannot reach p < 0.05 / 6
        rcav_influence(pairs, X, net, alpha=1.0, n_perm=60, seed=0)
    res = rcav_influence(pairs, X, net, alpha=1.0, n_perm=150, seed=0)
    assert res.significant[0, 0] and res.effect[0, 0] > 0
    assert not res.significant[1].any() and torch.allclose(res.effect[1], torch.zeros(3), atol=1e-6)
    assert res.p_values[1].min() == 1.0
    assert res.sdc == 1 and res.scdp >= 1
    paired = rcav_influence(pairs, X, net, alpha=1.0, n_perm=150, seed=0, test="paired")
    assert paired.significant[0].sum() >= 2 and not paired.significant[1].any()
    assert torch.equal(paired.effect, res.effect)


def test_rcav_null_is_a_cav_of_permuted_labels_and_the_pattern_null_a_random_pattern():
    """The network reads only the activations' one high-variance direction e0, and s = (e0 + e1) / sqrt 2. A
    random *pattern* (difference of means of random position sets ~ Sigma noise) points mostly along e0, so s is
    no more influential than it; a CAV fitted on permuted labels (~ Sigma^-1 noise) points mostly elsewhere, so
    against RCAV's null s is significant."""
    g = torch.Generator().manual_seed(0)
    D = 8
    net = syn.PooledLinear(D, 3)
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.weight[0, 0], net.fc.weight[1, 0] = 0.1, -0.1
        net.fc.bias.zero_()
    X = torch.randn(300, 2, D, generator=g)
    X[..., 0] *= 10.0
    s = torch.zeros(D, 1)
    s[:2] = 2 ** -0.5
    pairs = DirectionPairs(s.clone(), torch.zeros(1), s)
    positives = torch.rand(600, 1, generator=g) < 0.3
    kw = dict(alpha=1.0, n_perm=150, seed=0, positives=positives)
    rcav = rcav_influence(pairs, X, net, test="rcav", **kw)
    pattern = rcav_influence(pairs, X, net, test="pattern", **kw)
    assert torch.equal(rcav.effect, pattern.effect) and rcav.effect[0, 0] > 0
    assert rcav.significant[0, :2].all()
    assert not pattern.significant.any() and pattern.p_values.min() > 0.05
    assert pattern.null.abs().mean() > 5 * rcav.null.abs().mean()
    with pytest.raises(ValueError, match="'rcav', 'pattern' or 'paired'"):
        rcav_influence(pairs, X, net, test="cav", **kw)


# -- synthetic world and scoring ----------------------------------------------------------------------
def test_synthetic_world_matches_the_paper_setting():
    w = syn.make_world(0)
    assert w.S.shape == (16, 3) and w.Dist.shape == (16, 2)
    assert torch.allclose(w.S.norm(dim=0), torch.ones(3)) and torch.allclose(w.Dist.norm(dim=0), torch.ones(2))
    F = w.true_filters
    assert torch.allclose(F.T @ w.S, torch.eye(3), atol=1e-5) and torch.allclose(F.T @ w.Dist, torch.zeros(3, 2), atol=1e-5)
    s = syn.sample(w, 50, torch.Generator().manual_seed(0))
    assert s.X.shape == (150, 2, 16) and torch.bincount(s.labels).tolist() == [50, 50, 50]
    assert (s.on.sum(-1) == 1).all()                                  # one concept on per position
    for n in range(150):
        present = set(s.on[n].nonzero()[:, 1].tolist())
        assert present == set(syn.CLASSES[int(s.labels[n])])
    assert (s.alpha[s.on] >= 2.5).all() and (s.alpha[~s.on] < 2.5).all() and (s.beta <= 5).all()
    assert torch.allclose(s.X, s.alpha @ w.S.T + s.beta @ w.Dist.T + 10.0)
    z = syn.sample(w, 50, torch.Generator().manual_seed(0), absent="zero")
    absent = ~z.on.any(1, keepdim=True).expand_as(z.on)
    assert (z.alpha[absent] == 0).all() and (z.alpha[~absent & ~z.on] > 0).all() and torch.equal(z.on, s.on)


def test_scoring_gives_the_ground_truth_directions_perfect_marks():
    w = syn.make_world(1)
    s = syn.sample(w, 100, torch.Generator().manual_seed(1))
    F = w.true_filters
    b = 2.5 + F.T @ torch.full((16,), 10.0)
    truth = Components("truth", w.S, F, lambda x: x @ F - b, thresholds=torch.zeros(3))
    r = score_against_truth(truth, s.X, s.on, s.alpha, w.S, torch.full((16,), 10.0), s.X.reshape(-1, 16))
    assert r["iou"] == pytest.approx([1.0] * 3) and r["cos"] == pytest.approx([1.0] * 3)
    assert max(r["rmse"]) < 1e-4 and max(r["rmse_filter"]) < 1e-4
    shuffled = Components("shuffled", w.S[:, [2, 0, 1]], F[:, [2, 0, 1]], lambda x: x @ F[:, [2, 0, 1]] - b[[2, 0, 1]],
                          thresholds=torch.zeros(3))
    r2 = score_against_truth(shuffled, s.X, s.on, s.alpha, w.S, torch.full((16,), 10.0), s.X.reshape(-1, 16))
    assert r2["iou"] == pytest.approx([1.0] * 3) and r2["cos"] == pytest.approx([1.0] * 3)  # matching undoes order


# -- a reduced synthetic run ---------------------------------------------------------------------------
@pytest.mark.slow
def test_reduced_synthetic_run_recovers_the_direction_pairs():
    w = syn.make_world(7)
    g = torch.Generator().manual_seed(7)
    train, test = syn.sample(w, 300, g), syn.sample(w, 300, g)
    net, report = syn.train_network(train, test, epochs=600)
    assert report["test_accuracy"] > 0.85
    cfg = PRESETS["smoke"]
    pairs = fit_eddp(train.X, net, 3, cfg, seed=0)
    assert set(pairs.history) >= {"a", "b", "d"} and len(pairs.history["d"]) > 1
    comp = Components("eddp", pairs.S, pairs.W, lambda x: x @ pairs.W - pairs.b, thresholds=torch.zeros(3))
    r = score_against_truth(comp, test.X, test.on, test.alpha, w.S, torch.full((16,), 10.0), train.X.reshape(-1, 16))
    assert min(r["cos"]) >= 0.9, r
    assert min(r["iou"]) >= 0.8, r
    assert torch.allclose((pairs.W * pairs.S).sum(0), torch.ones(3), atol=1e-4)  # w_i^T s_i = 1



def test_fit_eddp_without_network_and_bad_inputs():
    X = syn.sample(syn.make_world(0), 20, torch.Generator().manual_seed(0)).X
    cfg = EDDPConfig(epochs_a=3, epochs_b=3, epochs_d=3, lr_a=1e-2, lr_b=1e-2, lr_d=1e-3, log_every=1, restarts_a=2)
    pairs = fit_eddp(X, None, 3, cfg, seed=0)
    assert pairs.W.shape == pairs.S.shape == (16, 3) and pairs.b.shape == (3,)
    assert "uur" not in pairs.history["b"][-1] and "cur" not in pairs.history["d"][-1]
    assert len(pairs.history["a_restarts"]["final_loss"]) == 2
    with pytest.raises(ValueError):
        fit_eddp(X.reshape(-1, 16), None, 3, cfg)
    with pytest.raises(ValueError):
        fit_eddp(X, None, 17, cfg)
