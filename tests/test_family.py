"""The guidance family: every preset guides, MPGD skips the UNet backward, schedules, adaptive stop."""
import math

import pytest
import torch

from featinv import get_method, invert
from featinv.guidance import Guidance
from featinv.schedules import recurrence_counts, weight_multipliers

FAMILY = ["shirahama2025", "fast", "dps", "freedom", "mpgd", "ugd", "tfg"]


def short(name):
    """Each preset at 12 steps (the 1000-step ones at the tiny prior's 100 training steps) and at
    most 2 recurrences, so the test takes seconds; the other knobs stay as the preset has them."""
    m = get_method(name)
    kw = dict(steps=100 if m.steps == 1000 else 12)
    if m.early_steps:
        kw.update(early_steps=2, early_recurrence=4)
    if m.recurrence > 2:
        kw["recurrence"] = 2
    return get_method(name, **kw)


@pytest.fixture
def target(tiny_encoder):
    torch.manual_seed(5)
    return tiny_encoder(torch.rand(8, 1, 8, 8)).detach()


@pytest.mark.parametrize("name", FAMILY)
def test_every_preset_lowers_distance_vs_unguided(name, blob_prior, tiny_encoder, target):
    common = dict(prior=blob_prior, encoder=tiny_encoder, seed=3)
    method = short(name)
    unguided = invert(target, method="unguided", steps=method.steps, **common)
    guided = invert(target, method=method, **common)
    assert guided.final_l2.mean() < 0.9 * unguided.final_l2.mean(), (guided.final_l2, unguided.final_l2)


def test_mpgd_never_backpropagates_through_the_unet(tiny_prior, tiny_encoder, target):
    calls = {"backward": 0}
    h = tiny_prior.unet.conv_in.register_full_backward_hook(lambda *a: calls.__setitem__("backward", calls["backward"] + 1))
    try:
        r = invert(target, prior=tiny_prior, encoder=tiny_encoder, method="mpgd", steps=8)
        assert calls["backward"] == 0 and (r.backward == 0).all() and (r.nfe == 8).all()
        r = invert(target[:1], prior=tiny_prior, encoder=tiny_encoder, method="dps", steps=100)
        assert calls["backward"] == 100  # a z_t-gradient method does, once per evaluation
    finally:
        h.remove()


def test_weight_schedules_have_their_shape():
    acp = torch.linspace(0.999, 0.01, 100).cumprod(0).clamp_min(1e-4)
    ts = list(range(99, -1, -10))
    const = weight_multipliers("constant", ts, acp)
    dec, inc = weight_multipliers("linear_decay", ts, acp), weight_multipliers("linear_increase", ts, acp)
    cos = weight_multipliers("cosine_decay", ts, acp)
    assert const == [1.0] * 10 and dec[0] == 1 and dec[-1] == 0 and inc[0] == 0 and inc[-1] == 1
    assert all(a >= b for a, b in zip(dec, dec[1:])) and all(a >= b for a, b in zip(cos, cos[1:]))
    assert cos[0] == pytest.approx(1) and cos[-1] == pytest.approx(0, abs=1e-12)
    beta, alpha = weight_multipliers("beta", ts, acp), weight_multipliers("alpha", ts, acp)
    assert sum(beta) / 10 == pytest.approx(1) and sum(alpha) / 10 == pytest.approx(1)
    sig = weight_multipliers("sigma", ts, acp)
    assert sig[0] == pytest.approx(math.sqrt(1 - acp[99])) and all(a >= b for a, b in zip(sig, sig[1:]))
    win = weight_multipliers("constant", ts, acp, window=(0.0, 0.3))
    assert win == [1.0] * 3 + [0.0] * 7
    with pytest.raises(ValueError, match="unknown weight schedule"):
        weight_multipliers("cubic", ts, acp)


def test_recurrence_schedules():
    assert recurrence_counts(6, 8, 2, 1000) == [1000, 1000, 8, 8, 8, 8]
    assert recurrence_counts(11, 10, window=(0.2, 0.5)) == [1, 1, 10, 10, 10, 10, 1, 1, 1, 1, 1]
    assert get_method("freedom").nfe() == sum(get_method("freedom").recurrences())


def test_adaptive_stop_lowers_nfe_and_keeps_cosine(tiny_prior, tiny_encoder, target):
    base = dict(prior=tiny_prior, encoder=tiny_encoder, method="fast", steps=12, recurrence=2, early_steps=0)
    full = invert(target, **base)
    tau = float(full.final_cos.median()) - 0.02  # a threshold some samples reach along the way
    stopped = invert(target, stop_cos=tau, **base)
    early = stopped.nfe < full.nfe
    assert early.any() and stopped.nfe.sum() < full.nfe.sum()
    assert (stopped.final_cos[early] >= tau - 1e-5).all()  # a stopped sample returns an image at >= tau
    assert torch.equal(stopped.images[~early], full.images[~early])  # the others are untouched
    assert stopped.distances.shape == full.distances.shape and torch.isfinite(stopped.distances).all()


def test_invalid_knobs_are_refused():
    with pytest.raises(ValueError, match="norm"):
        Guidance(norm="l3")
    with pytest.raises(ValueError, match="z_weight"):
        Guidance(norm="step", weight=4.0)


def test_yaml_lists_become_tuples():
    assert get_method("fast", window=[0.0, 0.5]).window == (0.0, 0.5)
