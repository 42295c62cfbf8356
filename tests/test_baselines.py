"""Optimisation baselines (pixel, fourier, deepinversion) and objectives on tiny random-init models."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import featinv
import featinv.baselines  # noqa: F401  (registers the presets)
from featinv import get_method, invert
from featinv.baselines import (DeepInversion, FourierVisualization, NotApplicableError, PixelInversion,
                               fourier_image, image_shape)
from featinv.encoders import Encoder
from featinv.contract import make_generators
from featinv.metrics import rel_l2, sq_l2
from featinv.objectives import (Activation, ClassLogit, Direction, FeatureMatch, make_objective,
                                resolve_objective)

STEPS = 30
METHODS = ["pixel", "fourier", "deepinversion"]


class TinyBNCNN(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.penultimate = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, dim), nn.Tanh())
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.penultimate(self.features(x)))


@pytest.fixture
def bn_encoder():
    torch.manual_seed(2)
    m = TinyBNCNN().train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(5):
            m(torch.rand(16, 1, 8, 8))
    return Encoder(m, "penultimate", input_size=8, in_chans=1, name="tiny-bn-cnn")


@pytest.fixture
def target(tiny_encoder):
    torch.manual_seed(5)
    return tiny_encoder(torch.rand(3, 1, 8, 8)).detach()


@pytest.fixture
def bn_target(bn_encoder):
    torch.manual_seed(6)
    return bn_encoder(torch.rand(3, 1, 8, 8)).detach()


def _setup(name, tiny_encoder, bn_encoder, target, bn_target):
    return (bn_encoder, bn_target) if name == "deepinversion" else (tiny_encoder, target)


# -- registration ---------------------------------------------------------------------------------------
def test_presets_reachable_and_configurable():
    assert isinstance(get_method("pixel"), PixelInversion)
    assert isinstance(featinv.get_method("fourier"), FourierVisualization)
    assert isinstance(featinv.methods.get_method("deepinversion"), DeepInversion)
    assert set(METHODS) <= set(featinv.list_methods())
    m = get_method("pixel", tv_weight=10.0, objective={"kind": "activation", "index": 2})  # a YAML method dict
    assert (m.tv_weight, m.name, m.steps) == (10.0, "pixel", 300)
    assert isinstance(make_objective(m.objective), Activation)
    with pytest.raises(TypeError, match="no option"):
        get_method("fourier", weight=1.0)


def test_presets_found_in_a_fresh_interpreter():
    """``get_method("deepinversion")`` works from the one registry, ``featinv.methods``."""
    code = ("import sys; from featinv.methods import get_method; "
            "print(type(get_method('deepinversion')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "DeepInversion"


# -- behaviour ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_lowers_feature_distance_and_output_contract(name, tiny_prior, tiny_encoder, bn_encoder, target, bn_target):
    enc, tgt = _setup(name, tiny_encoder, bn_encoder, target, bn_target)
    seen = []
    out = get_method(name, steps=STEPS)(tiny_prior, enc, tgt, make_generators([0, 1, 2]), callback=seen.append)
    shape = (3, *image_shape(tiny_prior))
    assert shape == (3, 1, 8, 8)
    assert out.images.shape == out.best_images.shape == shape
    for im in (out.images, out.best_images):
        assert im.min() >= 0 and im.max() <= 1
    assert out.distances.shape == (3, STEPS) and torch.isfinite(out.distances).all()
    assert (out.distances[:, -1] < out.distances[:, 0]).all()
    assert (out.best_distance <= out.distances.min(dim=1).values + 1e-6).all()
    with torch.no_grad():  # the final image's distance is part of "best"
        assert (out.best_distance <= sq_l2(enc(out.images), tgt) + 1e-6).all()
    clean = name != "pixel"  # fourier/deepinversion also measure the untransformed image
    assert out.backward.tolist() == [STEPS] * 3 and out.nfe.tolist() == [2 * STEPS if clean else STEPS] * 3
    assert out.nonfinite.tolist() == [0, 0, 0]
    assert [s["step"] for s in seen] == list(range(STEPS))
    assert {"step", "t", "distance", "cosine", "x0", "z", "loss"} <= set(seen[0])
    assert torch.equal(seen[-1]["distance"], out.distances[:, -1])


@pytest.mark.parametrize("name", METHODS)
def test_activation_objective_rises(name, tiny_prior, tiny_encoder, bn_encoder, target, bn_target):
    enc, tgt = _setup(name, tiny_encoder, bn_encoder, target, bn_target)
    obj = Activation(4)
    method = get_method(name, steps=STEPS, objective="unit:4")  # the YAML string form
    seen = []
    out = method(tiny_prior, enc, tgt, make_generators([0, 1, 2]), callback=seen.append)
    with torch.no_grad():
        start = obj.activation(enc(seen[0]["x0"]))
        final = obj.activation(enc(out.images))
    torch.testing.assert_close(-out.distances[:, 0], start.cpu())  # distances track the objective
    assert (final > start).all()
    assert (-out.distances[:, -1] > -out.distances[:, 0]).all()


@pytest.mark.parametrize("name", METHODS)
def test_sample_alone_equals_sample_in_batch(name, tiny_prior, tiny_encoder, bn_encoder, target, bn_target):
    enc, tgt = _setup(name, tiny_encoder, bn_encoder, target, bn_target)
    method = get_method(name, steps=20)
    batch = method(tiny_prior, enc, tgt, make_generators([10, 11, 12]))
    alone = method(tiny_prior, enc, tgt[1:2], make_generators([11]))
    torch.testing.assert_close(alone.images[0], batch.images[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.best_images[0], batch.best_images[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.distances[0], batch.distances[1], atol=1e-5, rtol=1e-4)
    flipped = method(tiny_prior, enc, tgt.flip(0), make_generators([12, 11, 10]))
    torch.testing.assert_close(flipped.images.flip(0), batch.images, atol=1e-5, rtol=0)
    other = method(tiny_prior, enc, tgt[1:2], make_generators([99]))  # the seed matters (noise init)
    assert not torch.allclose(other.images[0], batch.images[1])


def test_pixel_constant_init_ignores_seed_and_sigmoid_param(tiny_prior, tiny_encoder, target):
    a = get_method("pixel", steps=15, init="constant")(tiny_prior, tiny_encoder, target, make_generators([0, 1, 2]))
    b = get_method("pixel", steps=15, init="constant")(tiny_prior, tiny_encoder, target, make_generators([7, 8, 9]))
    torch.testing.assert_close(a.images, b.images)
    s = get_method("pixel", steps=STEPS, param="sigmoid")(tiny_prior, tiny_encoder, target, make_generators([0, 1, 2]))
    assert s.images.min() > 0 and s.images.max() < 1
    assert (s.distances[:, -1] < s.distances[:, 0]).all()
    with pytest.raises(ValueError, match="init"):
        get_method("pixel", init="zeros")(tiny_prior, tiny_encoder, target, make_generators([0, 1, 2]))


def test_invert_api_runs_baselines(tiny_prior, tiny_encoder, target):
    r = invert(target, prior=tiny_prior, encoder=tiny_encoder, method="pixel", steps=STEPS)
    assert r.method == "pixel" and r.images.shape == (3, 1, 8, 8) and r.nfe.tolist() == [STEPS] * 3
    assert (r.best_l2 <= r.distances[:, 0]).all()


def test_fourier_three_channels(tiny_encoder):
    from conftest import tiny_unet_and_scheduler
    from featinv.priors import PixelPrior

    prior = PixelPrior(*tiny_unet_and_scheduler(channels=3))
    torch.manual_seed(0)
    spec = 0.3 * torch.randn(2, 3, 8, 5, 2)
    img = fourier_image(spec, (8, 8))
    assert img.shape == (2, 3, 8, 8) and img.min() > 0 and img.max() < 1
    assert not torch.allclose(img, fourier_image(spec, (8, 8), decorrelate=False))  # colours are mixed
    tgt = tiny_encoder(torch.rand(2, 3, 8, 8)).detach()  # the encoder averages 3 channels to 1
    out = get_method("fourier", steps=10)(prior, tiny_encoder, tgt, make_generators([0, 1]))
    assert out.images.shape == (2, 3, 8, 8) and out.images.min() >= 0 and out.images.max() <= 1


def test_fourier_fit_crop_keeps_the_scale(tiny_prior, tiny_encoder, target):
    """With padding but no warp, ``fit='crop'`` shows the encoder exactly the image; ``resize`` a
    shrunken copy (the cause of the gap to Lucent/horama on digits: benchmarks/results/peers.md)."""
    seen = []

    class Spy(nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc, self.input_size = enc, None

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.enc(x)

    still = dict(steps=1, pad=0.25, jitter=0.0, jitter2=0.0, scale=(1.0, 1.0), rotate=0.0, track_clean=False)
    gens = make_generators([0, 1, 2])
    for fit in ("crop", "resize"):
        seen.clear()
        out = get_method("fourier", fit=fit, **still)(tiny_prior, Spy(tiny_encoder), target, make_generators([0, 1, 2]))
        first = fourier_image(0.01 * featinv.contract.randn(gens, (1, 8, 5, 2)), (8, 8))
        gens = make_generators([0, 1, 2])
        assert seen[0].shape == (3, 1, 8, 8) and out.images.shape == (3, 1, 8, 8)
        assert torch.allclose(seen[0], first, atol=1e-5) == (fit == "crop"), fit
    assert get_method("fourier").fit == "crop"
    with pytest.raises(ValueError, match="fit='zoom' is invalid"):
        get_method("fourier", fit="zoom")


# -- deepinversion ----------------------------------------------------------------------------------------
def test_deepinversion_needs_batchnorm(tiny_prior, tiny_encoder, target, bn_encoder):
    with pytest.raises(NotApplicableError, match="deepinversion needs BatchNorm layers; tiny-cnn has none"):
        get_method("deepinversion", steps=2)(tiny_prior, tiny_encoder, target, make_generators([0, 1, 2]))
    assert issubclass(NotApplicableError, ValueError)
    with pytest.raises(NotApplicableError):
        invert(target, prior=tiny_prior, encoder=tiny_encoder, method="deepinversion", steps=2)
    early = Encoder(bn_encoder.model, "features.0", input_size=8, in_chans=1, name="early")  # before any BN
    with pytest.raises(NotApplicableError, match="runs before layer 'features.0'"):
        get_method("deepinversion", steps=2)(tiny_prior, early, early(torch.rand(3, 1, 8, 8)),
                                             make_generators([0, 1, 2]))


def test_deepinversion_bn_term_is_per_sample_and_hooks_removed(tiny_prior, bn_encoder, bn_target):
    bns = [m for m in bn_encoder.model.modules() if isinstance(m, nn.BatchNorm2d)]
    # with only the BN term (no feature loss, priors or augmentation), the loss is each sample's own
    only_bn = dict(steps=3, main_weight=0.0, tv_l2_weight=0.0, l2_weight=0.0, flip=False, jitter=0.0)
    seen, seen1 = [], []
    get_method("deepinversion", **only_bn)(tiny_prior, bn_encoder, bn_target, make_generators([0, 1, 2]),
                                            callback=seen.append)
    get_method("deepinversion", **only_bn)(tiny_prior, bn_encoder, bn_target[2:], make_generators([2]),
                                            callback=seen1.append)
    assert all(not m._forward_pre_hooks for m in bns)
    x = seen[0]["x0"]
    acts, expect = {}, torch.zeros(3)
    hs = [m.register_forward_pre_hook(lambda mod, i, k=k: acts.__setitem__(k, i[0])) for k, m in enumerate(bns)]
    with torch.no_grad():
        bn_encoder(x)
    for h in hs:
        h.remove()
    for k, m in enumerate(bns):
        a = acts[k]
        r = (a.mean((2, 3)) - m.running_mean).norm(dim=1) + (a.var((2, 3), unbiased=False) - m.running_var).norm(dim=1)
        expect += (10.0 if k == 0 else 1.0) * r
    torch.testing.assert_close(seen[0]["loss"], 0.05 * expect)
    torch.testing.assert_close(seen1[0]["loss"][0], seen[0]["loss"][2])
    assert seen[-1]["loss"].sum() < seen[0]["loss"].sum()  # the BN statistics move towards the running ones


# -- objectives -------------------------------------------------------------------------------------------
def test_objectives_sign_and_shape():
    torch.manual_seed(0)
    f, t = torch.randn(4, 6), torch.randn(4, 6)
    fm = FeatureMatch()
    assert fm(f, t).shape == (4,) and (fm(f, t) > 0).all() and torch.allclose(fm(t, t), torch.zeros(4))
    torch.testing.assert_close(FeatureMatch(relative=True)(f, t), rel_l2(f, t))
    act = Activation(2)
    torch.testing.assert_close(act(f, t), -f[:, 2])
    g = f.clone()
    g[:, 2] += 1.0
    assert (act(g, t) < act(f, t)).all()  # more activation = lower loss
    torch.testing.assert_close(Activation([1, 3])(f), -(f[:, 1] + f[:, 3]) / 2)
    torch.testing.assert_close(ClassLogit(5)(f), -f[:, 5])
    assert (ClassLogit(5, log_prob=True)(f) >= 0).all()  # -log p >= 0
    torch.testing.assert_close(Direction()(2 * t, t), -torch.ones(4))
    torch.testing.assert_close(Direction(v=[1.0, 0, 0, 0, 0, 0])(f), -f[:, 0] / f.norm(dim=1))
    torch.testing.assert_close(Direction(v=-t)(t), torch.ones(4))
    with pytest.raises(IndexError):
        Activation(6)(f)


def test_channel_objective_via_avg_pool(tiny_encoder):
    """Encoder(pool="avg") at a conv layer: entry c is channel c's mean, the channel objective."""
    model = tiny_encoder.model
    raw = Encoder(model, "features", input_size=8, in_chans=1)  # flattened (B, 8*4*4)
    avg = Encoder(model, "features", input_size=8, in_chans=1, pool="avg")  # (B, 8)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        act = raw(x).view(2, 8, 4, 4)
        torch.testing.assert_close(Activation(3).activation(avg(x)), act[:, 3].mean((1, 2)))
        torch.testing.assert_close(Activation(3)(act), -act[:, 3].mean((1, 2)))  # raw (B, C, H, W) too
        torch.testing.assert_close(Activation(3 * 16 + 5)(raw(x)), -act[:, 3, 1, 1])  # one unit (c, y, x)


def test_make_objective_specs():
    assert make_objective(None) is None and isinstance(resolve_objective(None), FeatureMatch)
    assert make_objective("feature:relative").relative
    assert make_objective("channel:3").index == 3 and make_objective("unit:1,2").index == [1, 2]
    assert make_objective("logit:7").k == 7 and isinstance(make_objective("direction"), Direction)
    assert make_objective({"kind": "logit", "k": 2, "log_prob": True}).log_prob
    fn = lambda f, t: f.sum(1)  # noqa: E731  any callable passes through
    assert make_objective(fn) is fn
    with pytest.raises(KeyError):
        make_objective("nope:1")
    with pytest.raises(KeyError):
        make_objective({"index": 1})
