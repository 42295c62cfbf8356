"""The guided sampler against a hand-written reference, step by step (issue 11).

Each test recomputes the update of Shirahama et al. (2025) with its own code -- Tweedie, the
gradient through the prior, rescale to ||eps||, the mean ± k·std clamp, eps' = eps + w g, the DDIM /
DDPM step and the self-recurrence re-noise -- and compares featinv's sampler with it to float
precision. Breaking any of those lines in featinv/guidance.py (or the 8-bit rounding in
featinv/encoders.py) fails a test here; ``python tools/mutants.py`` checks exactly that.
"""
import math

import pytest
import torch

import featinv
from featinv.contract import make_generators, randn
from featinv.encoders import Encoder
from featinv.guidance import Guidance, ddim_step
from featinv.priors import PixelPrior


# -- a reference implementation, written independently of featinv.guidance ---------------------------
def ref_clamp(g, k):
    m = g.flatten(1).mean(1).view(-1, 1, 1, 1)
    s = g.flatten(1).std(1).view(-1, 1, 1, 1)
    return torch.minimum(torch.maximum(g, m - k * s), m + k * s)


def ref_sample(prior, encoder, target, seeds, *, steps, w, k, K, eta, decode_clamp="hard"):
    """Shirahama et al. 2025 Alg. 1 on the prior's trailing timesteps, K recurrences at every step."""
    gens = make_generators(seeds)
    T = prior.num_train_timesteps
    ts = [round(T * (steps - i) / steps) - 1 for i in range(steps)]
    acp = prior.alphas_cumprod.double()
    alphas = [float(acp[t]) for t in ts] + [1.0]
    z = randn(gens, prior.latent_shape)
    for i, t in enumerate(ts):
        a, ap = alphas[i], alphas[i + 1]
        for rep in range(K):
            zt = z.detach().requires_grad_(True)
            eps = prior.eps(zt, t)
            x0 = (zt - math.sqrt(1 - a) * eps) / math.sqrt(a)
            img = prior.decode(x0, clamp=decode_clamp)
            loss = (encoder(img) - target).pow(2).sum(1)
            (g,) = torch.autograd.grad(loss.sum(), zt)
            eps = eps.detach()
            if w:
                scale = eps.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1).clamp_min(1e-12)
                g = ref_clamp(g * scale.view(-1, 1, 1, 1), k) if k is not None else g * scale.view(-1, 1, 1, 1)
                eps = eps + w * g
            x0 = ((zt.detach() - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)  # DDPM clip_sample
            eps = (zt.detach() - math.sqrt(a) * x0) / math.sqrt(1 - a)
            sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
            noise = randn(gens, prior.latent_shape) if eta > 0 else 0
            z = math.sqrt(ap) * x0 + math.sqrt(max(1 - ap - sigma ** 2, 0)) * eps + sigma * noise
            if rep < K - 1:
                z = math.sqrt(a / ap) * z + math.sqrt(1 - a / ap) * randn(gens, prior.latent_shape)
    return prior.decode(z.detach())


@pytest.fixture
def setup(blob_prior, tiny_encoder):
    torch.manual_seed(11)
    target = tiny_encoder(torch.rand(3, 1, 8, 8)).detach()
    return blob_prior, tiny_encoder, target


def run(prior, encoder, target, seeds, decode_clamp="straight_through", **kw):
    g = Guidance(name="t", decode_clamp=decode_clamp, **kw)
    return g(prior, encoder, target, make_generators(seeds)).images


# -- the tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w,k,clamp", [(4.0, 3.0, "straight_through"), (2.0, 0.5, "straight_through"),
                                       (4.0, 3.0, "hard"), (0.0, None, "hard")])
def test_deterministic_guided_steps_equal_the_reference(setup, w, k, clamp):
    """eta = 0: Tweedie, gradient, rescale, clamp (k = 0.5 binds), eps' = eps + w g, DDIM step."""
    prior, enc, target = setup
    kw = dict(steps=4, weight=w, clamp_k=k, recurrence=1, early_steps=0, eta=0.0)
    ours = run(prior, enc, target, [1, 2, 3], decode_clamp=clamp, **kw)
    ref = ref_sample(prior, enc, target, [1, 2, 3], steps=4, w=w, k=k, K=1, eta=0.0, decode_clamp=clamp)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


def test_ancestral_steps_with_recurrence_equal_the_reference(setup):
    """eta = 1 (DDPM) with K = 3: the per-sample noise order and the re-noise sqrt(a_t / a_t') z + ..."""
    prior, enc, target = setup
    kw = dict(steps=3, weight=4.0, clamp_k=3.0, recurrence=3, early_steps=0, eta=1.0)
    ours = run(prior, enc, target, [5, 6, 7], **kw)
    ref = ref_sample(prior, enc, target, [5, 6, 7], steps=3, w=4.0, k=3.0, K=3, eta=1.0,
                     decode_clamp="straight_through")
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


def test_renoise_restores_the_marginal_of_t(blob_prior):
    """Self-recurrence maps z_t' back to q(z_t): on data whose marginals are known (x0 fixed),
    z_t' ~ N(sqrt(a') x0, 1 - a') re-noised must be N(sqrt(a) x0, 1 - a), for every t -> t'."""
    from featinv.guidance import guided_sample  # noqa: F401  (the loop is what the exact tests above cover)

    a, ap = 0.3, 0.6
    x0 = torch.full((20000, 1), 0.5)
    g = torch.Generator().manual_seed(0)
    z_prev = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * torch.randn(x0.shape, generator=g)
    z = math.sqrt(a / ap) * z_prev + math.sqrt(1 - a / ap) * torch.randn(x0.shape, generator=g)
    assert abs(z.mean() - math.sqrt(a) * 0.5) < 0.02 and abs(z.var() - (1 - a)) < 0.02


def test_ddim_step_is_the_ddpm_posterior_step():
    """eta = 1 on consecutive training timesteps equals diffusers' DDPMScheduler.step, clipped or not."""
    from diffusers import DDPMScheduler

    for clip in (None, 1.0):
        sched = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=clip is not None)
        sched.set_timesteps(100)
        acp = sched.alphas_cumprod.double()
        z, eps = torch.randn(2, 1, 8, 8) * 3, torch.randn(2, 1, 8, 8)
        for t in (99, 50, 1, 0):
            ref = sched.step(eps, t, z, generator=torch.Generator().manual_seed(t)).prev_sample
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
            ours = ddim_step(z, eps, float(acp[t]), float(acp[t - 1]) if t > 0 else 1.0, 1.0, noise, clip)
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_few_steps_on_a_cosine_schedule_stay_finite():
    """5 trailing steps on the digits prior (a_999 ~ 2e-9): float32 coefficients gave NaN here."""
    prior = featinv.build_prior("zoo:digits-ddpm")
    target = featinv.build_encoder("zoo:digits-cnn")(torch.rand(2, 1, 16, 16)).detach()
    for method in ("unguided", "fast"):
        r = featinv.invert(target, prior=prior, method=method, steps=5, recurrence=1, early_steps=0)
        assert torch.isfinite(r.images).all() and torch.isfinite(r.final_cos).all()
    r = featinv.invert(target, prior=prior, method="unguided", steps=61)  # 61 does not divide 1000
    assert torch.isfinite(r.images).all() and r.distances.shape == (2, 61)


def test_hard_decode_clamp_has_no_gradient_on_saturated_pixels():
    prior = PixelPrior(*__import__("conftest").tiny_unet_and_scheduler())
    x = torch.tensor([[[[-3.0, 0.0], [0.5, 2.0]]]], requires_grad=True)
    (g_hard,) = torch.autograd.grad(prior.decode(x, clamp="hard").sum(), x)
    (g_st,) = torch.autograd.grad(prior.decode(x, clamp="straight_through").sum(), x)
    assert g_hard.flatten().tolist() == [0.0, 0.5, 0.5, 0.0] and g_st.flatten().tolist() == [0.5] * 4
    torch.testing.assert_close(prior.decode(x, clamp="hard"), prior.decode(x, clamp="straight_through"))
    assert featinv.get_method("shirahama2025").decode_clamp == "hard"


def test_quantize_rounds_to_8_bits_with_a_straight_through_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    q, plain = Encoder(model, quantize=True), Encoder(model, quantize=False)
    img = (torch.rand(2, 1, 4, 4) * 0.9 + 0.002).requires_grad_(True)
    rounded = (img.detach() * 255).round() / 255
    torch.testing.assert_close(q(img), plain(rounded), atol=0, rtol=0)
    assert not torch.allclose(q(img), plain(img), atol=1e-6)
    (gq,) = torch.autograd.grad(q(img).sum(), img)
    (gp,) = torch.autograd.grad(plain(img).sum(), img)
    torch.testing.assert_close(gq, gp)  # identity backward through the rounding


@pytest.mark.slow
def test_the_issue_mutants_are_killed():
    """tools/mutants.py: each of the five breakages named in issue 11 fails the sampler tests."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "tools" / "mutants.py"), "--only", "tweedie", "no-renoise",
                           "renoise-no-sqrt-ratio", "no-std-clamp", "no-8bit-rounding"],
                          capture_output=True, text=True, timeout=1200, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "5 killed, 0 survived" in proc.stdout
