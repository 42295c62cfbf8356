"""The embedded digits world: data split, committed weights, recorded accuracies, the prior's UNet."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from featinv.zoo import digits as D  # noqa: E402

torch.set_num_threads(2)

META = json.loads((D.WEIGHTS_DIR / "meta.json").read_text())


# -- data ------------------------------------------------------------------------------------------
def test_split_sizes_disjoint_and_deterministic():
    tr, te, al = D.split_indices("train"), D.split_indices("test"), D.split_indices("all")
    assert len(tr) == 1437 and len(te) == 360 and len(al) == 1797
    assert len(tr) + len(te) == 1797
    assert not set(tr.tolist()) & set(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(1797))
    x_all, y_all = D.load_digits("all")
    for split, idx in (("train", tr), ("test", te)):
        x, y = D.load_digits(split)
        assert x.shape == (len(idx), 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert 0 <= x.min() and x.max() <= 1
        assert torch.equal(x, x_all[idx]) and torch.equal(y, y_all[idx])
        x2, y2 = D.load_digits(split)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # stratified: every class in both splits in (almost) the overall proportion
    assert torch.bincount(D.load_digits("test")[1], minlength=10).min() >= 35
    assert META["digits-cnn"]["data"]["n_train"] == 1437 and META["digits-cnn"]["data"]["random_state"] == 0


def test_load_digits_returns_clones_and_validates_split():
    x, _ = D.load_digits("test")
    x.zero_()
    assert D.load_digits("test")[0].max() > 0
    with pytest.raises(ValueError, match="split"):
        D.load_digits("nope")
    # val: 256 digits of train (hyper-parameters are chosen there), never a test digit
    val, train, test = (D.load_digits(s)[0].flatten(1) for s in ("val", "train", "test"))
    assert len(val) == 256 and (torch.cdist(val, train).min(1).values == 0).all()
    assert not (torch.cdist(val, test) == 0).all(1).any()


# -- classifiers -----------------------------------------------------------------------------------
@torch.no_grad()
def _acc(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name,loader", [("digits-cnn", D.load_digits_cnn), ("digits-vit", D.load_digits_vit)])
def test_classifier_accuracy_matches_meta(name, loader):
    model = loader()
    assert not model.training
    x, y = D.load_digits("test")
    acc = _acc(model, x, y)
    assert abs(acc - META[name]["test_accuracy"]) <= 0.005, (acc, META[name]["test_accuracy"])
    assert acc >= (0.97 if name == "digits-cnn" else 0.95)
    assert sum(p.numel() for p in model.parameters()) == META[name]["params"]


def test_cnn_penultimate_feature():
    cnn = D.load_digits_cnn()
    x, _ = D.load_digits("test")
    with torch.no_grad():
        f = cnn.penultimate(cnn.features(x[:8]))
        assert f.shape == (8, 64) and (f >= 0).all()
        assert torch.allclose(cnn.head(f), cnn(x[:8]), atol=1e-6)
    assert D.CNN_FEATURE_LAYER in dict(cnn.named_modules())


def test_vit_feature_layer_is_cls_after_final_norm():
    vit = D.load_digits_vit()
    x, _ = D.load_digits("test")
    store = {}
    h = dict(vit.named_modules())[D.VIT_FEATURE_LAYER].register_forward_hook(lambda m, i, o: store.update(o=o))
    try:
        with torch.no_grad():
            vit(x[:8])
            ref = vit.forward_features(x[:8])[:, 0]
    finally:
        h.remove()
    assert store["o"].shape == (8, 64)
    assert torch.allclose(store["o"], ref, atol=1e-6)


# -- prior -----------------------------------------------------------------------------------------
def test_prior_loads_and_predicts_noise():
    unet, sched = D.load_digits_ddpm()
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1 and unet.config.out_channels == 1
    assert sched.config.prediction_type == "epsilon" and sched.config.num_train_timesteps == 1000
    assert sum(p.numel() for p in unet.parameters()) == META["digits-ddpm"]["params"]
    x, _ = D.load_digits("test")
    x0 = x[:64] * 2 - 1
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.full((len(x0),), 500, dtype=torch.long)
    with torch.no_grad():
        pred = unet(sched.add_noise(x0, eps, t), t).sample
    assert pred.shape == x0.shape
    mse = torch.mean((pred - eps) ** 2).item()
    assert mse < 1.0  # predicting zero scores E[eps^2] = 1
    assert mse < 2 * META["digits-ddpm"]["test_eps_mse_by_timestep"]["500"] + 0.02  # consistent with meta.json


def test_weights_are_small():
    """The digits world stays under 8 MB; every committed weight (digits + shapes) under 37 MB (was 30 MB until
    shapes-sd's VAE got its own fine-tuned decoder and shapes-multi-sd kept the shapes-vae stage's file, 1.9 MB;
    32 MB until the mini-CLIP's ModifiedResNet tower, 5.9 MB against the ViT's 1.1 MB, which saw no shape).

    Symlinks are counted once, as git stores them."""
    files = [p for p in D.WEIGHTS_DIR.rglob("*") if p.is_file() and not p.is_symlink()]
    digits = [p for p in files if p.name.startswith("digits") or "digits-" in str(p.relative_to(D.WEIGHTS_DIR))]
    assert sum(p.stat().st_size for p in digits) < 8e6
    assert sum(p.stat().st_size for p in files) < 37e6


def test_a_few_guided_steps_on_the_real_prior_lower_the_distance():
    import featinv

    images, _ = D.load_digits("test")
    prior, enc = featinv.build_prior("zoo:digits-ddpm"), featinv.build_encoder("zoo:digits-cnn")
    common = dict(prior=prior, encoder=enc, keys=[("t", i) for i in range(4)], steps=8)
    guided = featinv.invert(images[:4], method="fast", recurrence=1, early_steps=0, **common)
    unguided = featinv.invert(images[:4], method="unguided", **common)
    assert guided.final_l2.mean() < 0.5 * unguided.final_l2.mean()
    assert guided.distances[:, -1].mean() < guided.distances[:, 0].mean()
