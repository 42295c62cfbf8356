"""DEPICT (featinv.explain.depict) at reduced size: the renderer as generator, planted classifiers whose
concept dependence is known, the tiny-prior caption generator, Grad-CAM, and the Lightning module."""
import json

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from featinv.explain import shapes_oracles as SO
from featinv.explain.depict import CaptionGenerator, SceneCache, auroc, classifier_metric, permuted_table, run_depict
from featinv.zoo.shapes import world as W

N = 40


@pytest.fixture(scope="module")
def scenes():
    x, rows = W.load_split("multi", "val", N)
    return x, rows


@pytest.fixture(scope="module")
def detector():
    return SO.presence_detector()


class Planted(nn.Module):
    """A classifier that uses exactly the concepts in ``weights``: logit = sum_k w_k h_k(x) + b with h the
    trained concept detector's presence probabilities (its layer ``det.net.body.11`` is an 8x8 map)."""

    def __init__(self, det, weights: dict[int, float], bias: float = 0.0):
        super().__init__()
        self.det, self.weights, self.bias = det, weights, bias

    def forward(self, x):
        p = self.det.net.predict(x.float().clamp(0, 1))["presence"].sigmoid()
        logit = sum(w * p[:, k] for k, w in self.weights.items()) + self.bias
        return torch.stack([-logit / 2, logit / 2], 1)


class CountingOracle(SO.RendererOracle):
    def __init__(self, rows):
        super().__init__(rows)
        self.images = 0

    def __call__(self, presence, scenes):
        self.images += len(scenes)
        return super().__call__(presence, scenes)


def test_permutation_preserves_prevalence_and_changes_one_column(scenes):
    _, rows = scenes
    p = rows["present"]
    for j in range(6):
        t = permuted_table(p, j, 3, seed=5)
        assert t[:, j].sum() == p[:, j].sum()  # prevalence preserved
        assert (np.delete(t, j, 1) == np.delete(p, j, 1)).all()  # other columns untouched
        assert (t[:, j] != p[:, j]).any()
    assert (permuted_table(p, 1, 0, 5) == permuted_table(p, 1, 0, 5)).all()
    assert not (permuted_table(p, 1, 0, 5) == permuted_table(p, 1, 1, 5)).all()


def test_metric_is_auroc_for_two_classes_and_accuracy_otherwise():
    y = np.array([0, 0, 1, 1])
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), y) == pytest.approx(0.75)
    assert classifier_metric(torch.tensor([[.9, .1], [.6, .4], [.65, .35], [.2, .8]]), y) == pytest.approx(0.75)
    assert classifier_metric(torch.eye(3)[[0, 1, 2, 0]], np.array([0, 1, 1, 0])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both classes"):
        auroc(np.array([0.2, 0.3]), np.array([1, 1]))


def test_renderer_depict_ranks_the_planted_concept_first_with_diagonal_independence(scenes, detector):
    x, rows = scenes
    p = rows["present"]
    clfs = {"red-circle": Planted(detector, {0: 1.0}), "blue-rect": Planted(detector, {5: 1.0}),
            "mixed": Planted(detector, {1: 2.0, 3: 1.0, 5: 1.0}, bias=-1.5)}
    labels = {"red-circle": p[:, 0].astype(int), "blue-rect": p[:, 5].astype(int),
              "mixed": (2 * p[:, 1] + p[:, 3] + p[:, 5] > 1.5).astype(int)}
    gen = CountingOracle(rows)
    r = run_depict(p, labels, clfs, gen, concept_names=SO.CONCEPTS, detector=detector, real_images=x,
                   permutations=3, seed=0)
    assert r.ranking("red-circle")[0] == "red circle" and r.ranking("blue-rect")[0] == "blue rectangle"
    imp = r.importance["mixed"]
    assert np.argmax(imp) == 1 and imp[3] > 0 and imp[5] > 0  # the sufficient concept first, then the pair
    assert np.allclose(imp[[0, 2, 4]], 0)  # unused concepts: exactly zero with the renderer
    assert r.deltas("red-circle").shape == (6, 3)
    assert np.allclose(r.independence[~np.eye(6, dtype=bool)], 0) and (np.diag(r.independence) > 0.2).all()
    assert r.off_diagonal == 0 and np.allclose(r.generation_gap, 0)  # the renderer reproduces the real scenes
    # only changed captions were generated: the base set + each scene's flip of each concept at most once
    flips = sum(len(set().union(*(np.nonzero(permuted_table(p, j, q)[:, j] != p[:, j])[0] for q in range(3))))
                for j in range(6))
    assert gen.images == r.images_generated == N + flips
    assert r.images_requested == N + sum(int((permuted_table(p, j, q)[:, j] != p[:, j]).sum())
                                         for j in range(6) for q in range(3))
    assert r.images_generated < r.images_requested
    d = r.to_dict()
    assert json.dumps(d, allow_nan=False) and d["ranking"]["red-circle"][0] == "red circle"


def test_scene_cache_and_concept_subset(scenes, detector):
    x, rows = scenes
    p = rows["present"]
    cache = SceneCache(CountingOracle(rows))
    clf = {"c": Planted(detector, {2: 1.0})}
    a = run_depict(p, {"c": p[:, 2].astype(int)}, clf, None, cache=cache, concept_names=SO.CONCEPTS,
                   concepts=[2, 4], permutations=2)
    n = cache.generated
    b = run_depict(p, {"c": p[:, 2].astype(int)}, clf, None, cache=cache, concept_names=SO.CONCEPTS,
                   concepts=[2, 4], permutations=2)
    assert cache.generated == n and b.images_generated == 0  # everything reused
    assert a.concepts == ["blue circle", "green rectangle"] and a.permuted["c"].shape == (2, 2)
    np.testing.assert_array_equal(a.permuted["c"], b.permuted["c"])
    assert a.independence is None and a.ranking("c")[0] == "blue circle"


def test_caption_generator_regenerates_only_changed_captions(tiny_sd_dir, scenes):
    from featinv.priors import LatentPrior

    _, rows = scenes
    p = rows["present"][:12]
    prior = LatentPrior.from_pretrained(str(tiny_sd_dir), local_files_only=True, cfg_scale=2.0)
    gen = CaptionGenerator(prior, SO.multi_caption, seed=1, steps=3, batch=8)
    calls = []
    cache = SceneCache(lambda pr, sc: calls.append(len(sc)) or gen(pr, sc))
    clf = {"c": nn.Sequential(nn.Flatten(), nn.LazyLinear(2))}
    clf["c"](torch.zeros(1, 3, 32, 32))
    lab = np.arange(12) % 2
    r = run_depict(p, {"c": lab}, clf, None, cache=cache, concept_names=SO.CONCEPTS, concepts=[0, 1], permutations=2)
    assert calls[0] == 12 and sum(calls) == r.images_generated < r.images_requested
    base = cache(p, np.arange(12))
    assert base.shape == (12, 3, 32, 32) and torch.isfinite(base).all() and 0 <= base.min() and base.max() <= 1
    # per-scene seeds: one scene generated alone equals the same scene in the batch
    torch.testing.assert_close(gen(p[3:4], np.array([3])), base[3:4], atol=1e-5, rtol=0)
    assert not torch.allclose(gen(p[3:4], np.array([4])), base[3:4])  # another scene's seed differs


def test_gradcam_baseline_ranks_the_planted_concept(scenes, detector):
    from featinv.explain.gradcam import gradcam_concept_importance

    x, rows = scenes
    clf = Planted(detector, {4: 1.0}, bias=-0.5)
    imp = gradcam_concept_importance(clf, "det.net.body.11", x, SO.concept_masks(rows))
    assert imp.shape == (6,) and np.isfinite(imp).all() and (imp >= 0).all() and imp.sum() <= 1 + 1e-6
    assert int(np.argmax(imp)) == 4


def _trainer(out):
    from featinv.callbacks import PredictionWriter, RunLogger

    return L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=out,
                     callbacks=[PredictionWriter(out), RunLogger()])


def test_depict_module_writes_records_plots_and_resumes(tmp_path, scenes, detector):
    from featinv.data import TargetDataModule
    from featinv.explain.modules import ClassifierTargets, DepictModule

    _, rows = scenes

    def make(gen):
        clfs = {"planted-green-rect": Planted(detector, {4: 1.0}), "planted-red-circle": Planted(detector, {0: 1.0})}
        labels = {"planted-green-rect": lambda r: r["present"][:, 4].astype(int),
                  "planted-red-circle": lambda r: r["present"][:, 0].astype(int)}
        return DepictModule(prior=None, generator=gen, split="val", n_scenes=N, permutations=2, classifiers=clfs,
                            labels=labels, gradcam_layer="det.net.body.11", examples=4)

    dm = TargetDataModule([ClassifierTargets(["planted-green-rect", "planted-red-circle"], name="planted")],
                          batch_size=1)
    gen = CountingOracle(rows)
    _trainer(tmp_path).predict(make(gen), datamodule=dm, return_predictions=False)
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {(r["index"], r["method"]) for r in recs} == {(i, m) for i in (0, 1) for m in ("depict", "oracle", "gradcam")}
    by = {(r["classifier"], r["method"]): r for r in recs}
    assert by[("planted-green-rect", "depict")]["top"] == "green rectangle"
    assert by[("planted-red-circle", "oracle")]["ranking"][0] == "red circle"
    gc = by[("planted-red-circle", "gradcam")]["importance"]
    assert len(gc) == 6 and 0 < sum(gc.values()) <= 1 + 1e-6
    assert by[("planted-red-circle", "depict")]["spearman_oracle"] == pytest.approx(1.0)
    assert len(by[("planted-green-rect", "depict")]["permuted"]["red circle"]) == 2
    assert (tmp_path / "plots" / "depict_planted-green-rect.png").is_file()
    assert len(list((tmp_path / "grids").glob("*.png"))) == 2
    first = gen.images
    assert first > N
    gen2 = CountingOracle(rows)  # resume: every record is there, nothing is generated again
    _trainer(tmp_path).predict(make(gen2), datamodule=dm, return_predictions=False)
    assert gen2.images == 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 6


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    from _tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-shapes-sd"))


def test_depict_on_a_categorical_factor_table():
    """DEPICT with the renderer on single-object scenes: permuting the factor a classifier reads matters,
    the others do not, and the reader's accuracy per factor is the validity metric."""
    x, rows = W.load_split("single", "val", 48)
    table = SO.factor_table(rows)
    reader = SO.factor_detector()

    class ColourClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.r = reader.reader.net

        def forward(self, im):
            return self.r.predict(im.float())["color"]

    r = run_depict(table, {"colour": table[:, 1]}, {"colour": ColourClassifier()}, SO.FactorOracle(rows),
                   concept_names=SO.FACTORS, detector=reader, real_images=x, permutations=2)
    assert r.metric["colour"] == "accuracy" and r.ranking("colour")[0] == "color"
    assert r.importance["colour"][1] > 0.5 and np.allclose(np.delete(r.importance["colour"], 1), 0)
    assert (r.detector_real > 0.95).all() and np.abs(r.generation_gap).max() == 0
    assert r.independence[1, 1] > 0.5 and r.off_diagonal < 0.05
    assert SO.single_caption(table[0]) == W.caption(rows[0])
