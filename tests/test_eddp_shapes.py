"""EDDP in a world with pixel-labelled concepts (issue 15, shapes part): the projection objective, the layer
split (f+ cut out of the model), Network-Dissection labelling with masks, RCAV / counterfactuals along planted
directions, AM readout, and the Lightning module with resume. Small stand-in models, fast."""
import json

import pytest
import torch
from torch import nn

from featinv.encoders import Encoder
from featinv.explain.am import label_value, maximise, rate, read
from featinv.explain.concepts import ConceptSet, dissect, label
from featinv.explain.counterfactual import class_targets, counterfactuals
from featinv.explain.dissection import s1_score, s2_score
from featinv.explain.layer import LayerSplit, downstream, to_map, to_positions
from featinv.objectives import Projection, make_objective, tile_direction

torch.set_num_threads(1)


# -- a planted world: 8x8 images, one square object, colour and "shape" known per image ----------------
def planted_world(n: int, seed: int = 0):
    """Images (n, 3, 8, 8): a 3x3 object at a random place on black; factor 'kind' (0: red object, 1: green
    object) and its object mask."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 2, (n,), generator=g)
    ys, xs = torch.randint(0, 6, (n,), generator=g), torch.randint(0, 6, (n,), generator=g)
    obj = torch.zeros(n, 8, 8)
    for j in range(n):
        obj[j, ys[j]:ys[j] + 3, xs[j]:xs[j] + 3] = 1
    img = torch.zeros(n, 3, 8, 8)
    img[:, 0] = obj * (kind == 0)[:, None, None]
    img[:, 1] = obj * (kind == 1)[:, None, None]
    return img, obj, {"kind": kind}


class PlantedNet(nn.Module):
    """conv (identity on R, G, plus an 'object' channel R+G) -> pooled linear head: class 0 = red, 1 = green.
    The layer 'conv' has 3 channels: channel 0 detects red pixels, 1 green pixels, 2 any object pixel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = self.conv.weight[1, 1] = 1
            self.conv.weight[2, 0] = self.conv.weight[2, 1] = 1
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[10.0, -10.0, 0.0], [-10.0, 10.0, 0.0]]))
            self.head.bias.zero_()
        self.heads = {"kind": 2}

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.fixture
def planted():
    enc = Encoder(PlantedNet().eval(), "conv", input_size=8, in_chans=3, name="planted")
    return LayerSplit(enc, class_names={"kind": ["red", "green"]})


# -- the objective ---------------------------------------------------------------------------------------
def test_projection_objective_gradient_ascends_the_projection():
    g = torch.Generator().manual_seed(0)
    C, H, W = 5, 4, 4
    torch.manual_seed(0)
    conv = nn.Conv2d(3, C, 3, padding=1)
    s = torch.randn(C, generator=g)
    obj = Projection(v=s)
    img = torch.rand(2, 3, H, W, generator=g, requires_grad=True)
    before = prev = obj.projection(conv(img)).detach()
    for _ in range(10):
        loss = obj(conv(img)).sum()
        (grad,) = torch.autograd.grad(loss, img)
        img = (img - 2.0 * grad).detach().requires_grad_(True)
        now = obj.projection(conv(img)).detach()
        assert (now > prev).all()                                  # gradient descent on the loss ascends
        prev = now
    assert (prev > before + 0.2).all()
    # value: the mean over positions of the dot product with the unit direction, on every input layout
    feat = conv(img).detach()
    ref = torch.einsum("bchw,c->b", feat, s / s.norm()) / (H * W)
    for f in (feat, feat.flatten(1), feat.flatten(2).transpose(1, 2)):
        assert torch.allclose(obj.projection(f), ref, atol=1e-5)
    # the target-field form (one direction per sample, as the harness uses it) gives the same number
    t = tile_direction(s.expand(2, C), H * W)
    assert torch.allclose(make_objective("projection").projection(feat.flatten(1), t), ref, atol=1e-5)
    assert torch.allclose(Projection()(feat.flatten(1), t), -ref, atol=1e-5)
    with pytest.raises(ValueError):
        Projection(v=torch.ones(7))(feat)


# -- the split -------------------------------------------------------------------------------------------
def test_downstream_graph_equals_the_model_and_refuses_skip_connections(planted):
    x = planted_world(8)[0]
    assert planted.check(x) < 1e-5
    X = planted.activations(x)
    assert X.shape == (8, 64, 3) and planted.hw == (8, 8)
    assert torch.equal(to_positions(to_map(X, (8, 8))), X)

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.b(self.a(x)) + x  # reads x after the layer 'a'

    with pytest.raises(ValueError, match="computed before"):
        downstream(Skip(), "a")


# -- labelling -------------------------------------------------------------------------------------------
def test_dissection_labels_planted_detectors_by_their_masks(planted):
    img, obj, lab = planted_world(200)
    cs = ConceptSet({"kind": ["red", "green"]}, background_factors=(), generic=True)
    masks = cs.masks(obj, lab)
    assert masks.shape == (200, 4, 8, 8)
    X = planted.activations(img)
    maps = to_map(X, planted.hw)                                  # channels: red, green, object
    iou = dissect(maps, torch.full((3,), 0.5), masks)
    lab_ = label(iou, cs.names)
    assert lab_.names == [("kind", "red"), ("kind", "green"), ("any", "object")]
    assert lab_.iou == pytest.approx([1.0, 1.0, 1.0])
    assert iou[0, 1] == 0 and iou[1, 0] == 0                       # red never fires on green objects
    assert s1_score(iou) == pytest.approx(3.0) and s2_score(iou) == pytest.approx(3.0)
    # a detector that fires everywhere has low IoU with everything -> its label is "any/background"-ish or none
    iou2 = dissect(torch.ones(200, 1, 8, 8), torch.zeros(1), masks)
    assert float(iou2.max()) == pytest.approx(float(masks[:, 3].float().mean()), abs=1e-4)
    assert label(dissect(-torch.ones(200, 1, 8, 8), torch.zeros(1), masks), cs.names).names == [("unlabelled", "")]


def test_influence_on_logits_sees_what_saturated_probabilities_hide(planted):
    """With the planted head made saturated (weights x20: logit margin ~ 56 on a red image) a step along the
    red direction cannot move the probabilities of an image already classified with p ~ 1, but moves its
    logits by exactly alpha * W s / |s| (f+ is linear in the pooled activation)."""
    from types import SimpleNamespace

    from featinv.explain.eddp_world import LayerConfig
    from featinv.explain.influence import rcav_influence

    with torch.no_grad():
        planted.encoder.model.head.weight.mul_(20)
    img, _, lab = planted_world(64, seed=3)
    X = planted.activations(img[lab["kind"] == 0])                 # red images: p(red) ~ 1 already
    pairs = SimpleNamespace(S=torch.eye(3)[:, :1])
    kw = dict(alpha=0.5, n_perm=80, seed=0, output="probs", test="paired")
    prob = rcav_influence(pairs, X, planted.f_plus, **kw)
    logit = rcav_influence(pairs, X, planted.logits, **kw)
    assert prob.effect.abs().max() < 1e-6
    assert logit.effect[0].tolist() == pytest.approx([0.5 * 200, -0.5 * 200], rel=1e-5)
    assert logit.significant[0].all() and not prob.significant.any()
    with pytest.raises(ValueError, match="influence_on='logit' is invalid"):
        LayerConfig(influence_on="logit")


# -- counterfactuals -------------------------------------------------------------------------------------
def test_counterfactual_along_the_planted_direction_flips_the_prediction(planted):
    img, _, lab = planted_world(100, seed=1)
    X = planted.activations(img)
    S = torch.eye(3)                                              # red, green, object directions
    targets = class_targets([("kind", "red"), ("kind", "green"), ("any", "object")], planted.classes())
    assert targets == [0, 1, None]
    cf = counterfactuals(planted, X, S, targets, torch.full((3,), 0.5), n_random=8, seed=0)
    assert cf.success[0] == 1.0 and cf.success[1] == 1.0 and cf.success[2] is None
    assert cf.n_images[0] == int((lab["kind"] == 1).sum())       # only images not already predicted red
    assert cf.control[0] < 0.9                                    # a random direction does not do it
    # the same intervention through the Encoder's own hook (run_from) agrees
    shift = 0.5 * S[:, 0].view(1, 3, 1, 1)
    green = img[lab["kind"] == 1]
    pred = planted.encoder.run_from(green, lambda o: o + shift).argmax(1)
    assert (pred == 0).all()
    # the object direction (ignored by the head) and the green direction never make "red"
    assert counterfactuals(planted, X, S[:, [2]], [0], torch.full((1,), 0.5)).success == [0.0]
    wrong = counterfactuals(planted, X, S[:, [1]], [0], torch.full((1,), 0.5))
    assert wrong.success == [0.0]                                 # green direction never makes "red"


# -- AM readout ------------------------------------------------------------------------------------------
class FakeReader:
    """Reads 'kind' = which of R, G is brighter, confidence 1 if the object is bright."""

    def read(self, images):
        r, g = images[:, 0].mean((1, 2)), images[:, 1].mean((1, 2))
        return {"kind": ((g > r).long(), (images.amax((1, 2, 3)) > 0.5).float())}


def test_am_with_the_projection_objective_draws_the_labelled_concept(planted):
    from featinv.methods import get_method
    from featinv.priors import PixelPrior
    from tests.conftest import tiny_unet_and_scheduler

    prior = PixelPrior(*tiny_unet_and_scheduler(size=8, channels=3))
    enc = planted.encoder
    planted.activations(torch.zeros(1, 3, 8, 8))
    S = torch.eye(3)
    method = get_method("pixel", steps=60, lr=0.1)
    am = maximise(method, prior, enc, S, [0, 1], n_samples=2, seed=0, dataset="planted")
    assert am.images.shape == (2, 2, 3, 8, 8)
    out = read(FakeReader(), am.images, [("kind", "red"), ("kind", "green")], {"kind": ["red", "green"]})
    assert rate(out.hit) == 1.0                                   # red direction -> red image, green -> green
    assert label_value(("any", "object"), {"kind": ["red", "green"]}) is None
    # the projection the method reached is above that of the initial grey image
    assert (am.projection > Projection(v=torch.eye(3)[0]).projection(enc(torch.full((1, 3, 8, 8), 0.5)))).all()
    with pytest.raises(ValueError, match="no directions to maximise"):
        maximise(method, prior, enc, S, [], n_samples=2)


# -- the Lightning module ----------------------------------------------------------------------------
@pytest.fixture
def random_classifier(tmp_path):
    """A random-init shapes-shape classifier saved where ``zoo:shapes-shape?path=`` finds it."""
    from safetensors.torch import save_file

    from featinv.zoo.shapes import encoders

    torch.manual_seed(0)
    m = encoders.build("shapes-shape")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "shapes-shape.safetensors"))
    return f"zoo:shapes-shape?path={tmp_path}"


def _module(**kw):
    from featinv.explain.eddp_module import EDDPModule
    from featinv.priors import PixelPrior
    from tests.conftest import tiny_unet_and_scheduler

    args = dict(prior=PixelPrior(*tiny_unet_and_scheduler(size=32, channels=3)), reader="zoo:shapes-reader",
                methods=[{"preset": "pixel", "steps": 3}, {"preset": "fast", "name": "guided", "steps": 3,
                                                          "recurrence": 1, "early_steps": 0}],
                eddp={"preset": "smoke", "epochs_a": 20, "epochs_b": 10, "epochs_d": 20, "restarts_a": 1},
                n_fit=16, n_eval=16, n_samples=2, influence_images=16, gallery=2)
    return EDDPModule(**{**args, **kw})


def _predict(module, dm, out):
    import lightning as L

    from featinv.callbacks import PredictionWriter, RunLogger

    L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, default_root_dir=out,
              callbacks=[PredictionWriter(out), RunLogger(out)]).predict(module, datamodule=dm, return_predictions=False)


def test_module_writes_records_images_grids_and_resume_skips_them(tmp_path, random_classifier):
    from featinv.data import TargetDataModule
    from featinv.explain.eddp_module import DirectionTargets

    dm = TargetDataModule([DirectionTargets(random_classifier, n_directions=3, name="clf")], batch_size=2)
    out = tmp_path / "out"
    module = _module()
    _predict(module, dm, out)
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["dataset"], r["index"], r["method"]) for r in recs} == {
        ("clf", i, m) for i in range(3) for m in ("pixel", "guided")}
    for r in recs:
        assert r["fingerprint"] and r["label"] == r["index"] and len(r["images"]) == 2
        assert all((out / p).exists() for p in r["images"])
        assert r["label_factor"] and "significant_rcav" in r and "significant_paired" in r
        assert r["am_on_manifold"] is not None and r["am_projection"] == r["am_projection"]  # not NaN
    assert len(list((out / "grids").glob("clf_*.png"))) == 3
    # the classifier was fitted once for the whole dataset (both batches)
    assert sum(1 for k in module._analyses if k[0] != "split") == 1
    # resume: same configuration -> every record is skipped and EDDP is not fitted again
    again = _module()
    _predict(again, dm, out)
    assert len((out / "results.jsonl").read_text().splitlines()) == len(recs)
    assert not [k for k in again._analyses if k[0] != "split"]
    # a changed method configuration gives new fingerprints: that method's records are redone
    changed = _module(methods=[{"preset": "pixel", "steps": 4}, {"preset": "fast", "name": "guided", "steps": 3,
                                                                 "recurrence": 1, "early_steps": 0}])
    from featinv.results import RunConflictError
    with pytest.raises(RunConflictError):
        _predict(changed, dm, out)
