"""The guided sampler on tiny random-init models: it guides, it records, it never mixes samples."""
import pytest
import torch

from featinv import Guidance, get_method, invert
from featinv.contract import make_generators, randn
from featinv.guidance import clamp_std, rescale_to

FAST = dict(steps=12, recurrence=2, early_steps=2, early_recurrence=4, schedule="constant")


@pytest.fixture
def target(tiny_encoder):
    torch.manual_seed(5)
    return tiny_encoder(torch.rand(4, 1, 8, 8)).detach()


def test_guidance_lowers_final_distance_vs_unguided_same_noise(tiny_prior, tiny_encoder, target):
    common = dict(prior=tiny_prior, encoder=tiny_encoder, seed=3)
    unguided = invert(target, method="fast", weight=0.0, clamp_k=None, **common, **FAST)
    guided = invert(target, method="fast", weight=8.0, **common, **FAST)
    assert guided.final_l2.mean() < 0.8 * unguided.final_l2.mean()
    assert guided.final_cos.mean() > unguided.final_cos.mean()
    assert (guided.backward == 12 * 2 + 2 * 2).all() and (guided.nfe == guided.backward).all()
    assert (unguided.backward == 0).all()


def test_distance_recorded_at_every_step_and_callback(tiny_prior, tiny_encoder, target):
    seen = []
    r = invert(target, prior=tiny_prior, encoder=tiny_encoder, method="fast", callback=seen.append, **FAST)
    assert r.distances.shape == (4, 12) and torch.isfinite(r.distances).all() and (r.distances > 0).all()
    assert [s["step"] for s in seen] == list(range(12))
    assert seen[0]["t"] > seen[-1]["t"]  # diffusion time runs down
    assert {"step", "t", "distance", "cosine", "x0", "z"} <= set(seen[0])
    assert torch.equal(seen[-1]["distance"], r.distances[:, -1])
    assert r.images.shape == r.best_images.shape == (4, 1, 8, 8)
    assert r.images.min() >= 0 and r.images.max() <= 1
    assert (r.best_l2 <= r.final_l2 + 1e-6).all()  # best of the trajectory includes the final image


def test_sample_alone_equals_sample_in_batch(tiny_prior, tiny_encoder, target):
    keys = [("d", i) for i in range(4)]
    batch = invert(target, prior=tiny_prior, encoder=tiny_encoder, method="fast", keys=keys, **FAST)
    alone = invert(target[2:3], prior=tiny_prior, encoder=tiny_encoder, method="fast", keys=keys[2:3], **FAST)
    torch.testing.assert_close(alone.images[0], batch.images[2], atol=1e-4, rtol=0)
    torch.testing.assert_close(alone.distances[0], batch.distances[2], atol=1e-4, rtol=1e-4)
    reversed_ = invert(target.flip(0), prior=tiny_prior, encoder=tiny_encoder, method="fast", keys=keys[::-1], **FAST)
    torch.testing.assert_close(reversed_.images.flip(0), batch.images, atol=1e-4, rtol=0)


def test_shaping_is_per_sample():
    g = torch.randn(3, 2, 4, 4)
    eps = torch.randn(3, 2, 4, 4)
    g2 = g.clone()
    g2[0] *= 1000  # a huge gradient in sample 0 must not change the others
    for fn in (lambda x: rescale_to(x, eps), lambda x: clamp_std(x, 1.0)):
        torch.testing.assert_close(fn(g)[1:], fn(g2)[1:])
    r = rescale_to(g2, eps)
    torch.testing.assert_close(r.flatten(1).norm(dim=1), eps.flatten(1).norm(dim=1))
    c = clamp_std(g, 1.0).flatten(1)
    m, s = g.flatten(1).mean(1, keepdim=True), g.flatten(1).std(1, keepdim=True)
    assert (c <= m + s + 1e-6).all() and (c >= m - s - 1e-6).all()


def test_ddim_eta1_step_is_ddpm_ancestral_step(tiny_prior):
    """DDPM ancestral sampling == DDIM with eta = 1 on the training timesteps (Song et al. 2021)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = tiny_prior.scheduler_config
    for clip in (False, True):  # featinv clips x0 in the update for pixel priors, as DDPM does
        ddpm = DDPMScheduler.from_config(cfg, clip_sample=clip)
        ddpm.set_timesteps(cfg["num_train_timesteps"])
        ddim = DDIMScheduler.from_config(cfg, clip_sample=clip, set_alpha_to_one=True, timestep_spacing="trailing")
        ddim.set_timesteps(cfg["num_train_timesteps"])
        assert torch.equal(ddpm.timesteps, ddim.timesteps)
        z, eps = torch.randn(2, 1, 8, 8) * 3, torch.randn(2, 1, 8, 8)
        for t in (99, 50, 1):
            a = ddpm.step(eps, t, z, generator=torch.Generator().manual_seed(t)).prev_sample
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
            b = ddim.step(eps, t, z, eta=1.0, variance_noise=noise, use_clipped_model_output=True).prev_sample
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_presets_and_schedule():
    ref = get_method("shirahama2025")
    ks = ref.recurrences()
    assert (ref.steps, ref.weight, ref.clamp_k, ref.eta) == (1000, 4.0, 3.0, 1.0)
    assert ks[:5] == [1000] * 5 and set(ks[5:]) == {8} and ref.nfe() == 5 * 1000 + 995 * 8
    assert get_method("fast", weight=2.0).weight == 2.0
    with pytest.raises(KeyError, match="Did you mean: 'fast'"):
        get_method("fsat")
    with pytest.raises(TypeError, match="no option"):
        get_method("fast", wieght=2)


def test_per_sample_generators_are_reproducible():
    a = randn(make_generators([1, 2]), (3,))
    b = randn(make_generators([2]), (3,))
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])


def test_nan_gradient_is_skipped_not_emitted(tiny_prior, tiny_encoder, target):
    class NaNAfter(torch.nn.Module):  # an encoder whose gradient is NaN for sample 0
        def __init__(self, enc):
            super().__init__()
            self.enc, self.name, self.dim = enc, "nan", enc.dim

        def forward(self, x):
            f = self.enc(x)
            if torch.is_grad_enabled() and f.requires_grad:
                f = torch.cat([f[:1] + (f[:1] - f[:1].detach()) * float("nan"), f[1:]])
            return f

    r = invert(target, prior=tiny_prior, encoder=NaNAfter(tiny_encoder), method="fast", **FAST)
    assert torch.isfinite(r.images).all()
    assert r.nonfinite[0] == r.nfe[0] and (r.nonfinite[1:] == 0).all()


def test_guidance_defaults_are_the_paper_preset():
    import dataclasses

    ref = dataclasses.asdict(get_method("shirahama2025"))
    assert {**dataclasses.asdict(Guidance()), "name": "shirahama2025"} == ref
    assert (ref["norm"], ref["recurrence"], ref["early_steps"], ref["early_recurrence"], ref["decode_clamp"]) == (
        "eps", 8, 5, 1000, "hard")
