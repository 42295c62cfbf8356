"""Extending featinv, as issue 12 promises: a new guidance method is one file (here: this one), a new
encoder family is one file, a new target dataset touches no featinv file."""
import json
from dataclasses import dataclass

import lightning as L
import torch

import featinv
from featinv.callbacks import PredictionWriter
from featinv.contract import SampleOutput
from featinv.data import TargetDataModule, TargetSource
from featinv.encoders import Encoder
from featinv.guidance import Guidance
from featinv.methods import get_method, list_methods, make_method, register_method
from featinv.module import InversionModule
from featinv.specs import build_encoder, register_encoder

from conftest import TinyCNN


# -- a new guidance preset and a new kind of method ---------------------------------------------------
register_method("test-strong", lambda **kw: Guidance(**{**dict(name="test-strong", steps=6, weight=8.0,
                                                               recurrence=1, early_steps=0), **kw}))


@dataclass
class BestOfNoise:
    """A trivial method: the best of ``n`` noise images per target (follows featinv.contract.Method)."""

    name: str = "best-of-noise"
    n: int = 4

    def __call__(self, prior, encoder, target, generators, *, cond=None, callback=None, progress=False):
        from featinv.contract import randn

        B = len(generators)
        shape = prior.decode(torch.zeros(1, *prior.latent_shape)).shape[1:]
        cands = torch.stack([randn(generators, shape).clamp(-1, 1) / 2 + 0.5 for _ in range(self.n)], 1)
        d = torch.stack([(encoder(cands[:, k]) - target).pow(2).sum(1) for k in range(self.n)], 1)
        best = d.argmin(1)
        img = cands[torch.arange(B), best]
        return SampleOutput(images=img, best_images=img, distances=d, best_distance=d.min(1).values,
                            nfe=torch.zeros(B, dtype=torch.long), backward=torch.zeros(B, dtype=torch.long),
                            nonfinite=torch.zeros(B, dtype=torch.long))


register_method("best-of-noise", lambda **kw: BestOfNoise(**kw))


def test_new_methods_registered_in_one_file_run_everywhere(tiny_prior, tiny_encoder):
    assert {"test-strong", "best-of-noise"} <= set(list_methods())
    assert get_method("test-strong", weight=2.0).weight == 2.0
    target = tiny_encoder(torch.rand(3, 1, 8, 8)).detach()
    strong = featinv.invert(target, prior=tiny_prior, encoder=tiny_encoder, method="test-strong")
    weak = featinv.invert(target, prior=tiny_prior, encoder=tiny_encoder, method="test-strong", weight=0.0,
                          clamp_k=None)
    assert strong.final_l2.mean() < weak.final_l2.mean()
    m = make_method({"preset": "best-of-noise", "name": "bon8", "n": 8})
    r = featinv.invert(target, prior=tiny_prior, encoder=tiny_encoder, method=m)
    assert r.method == "bon8" and r.distances.shape == (3, 8)
    torch.testing.assert_close(r.final_l2, r.distances.min(1).values, atol=1e-5, rtol=1e-4)


# -- a new encoder family ----------------------------------------------------------------------------
@register_encoder("tinyfam")
def _tiny_family(name, layer=None, *, quantize: bool = False, width: int = 16):
    torch.manual_seed(0)
    model = TinyCNN(dim=width)
    model(torch.zeros(1, 1, 8, 8))
    return Encoder(model, layer or "penultimate", input_size=8, in_chans=1, quantize=quantize,
                   name=f"tinyfam:{name}@{layer or 'penultimate'}")


def test_new_encoder_family_in_one_file():
    enc = build_encoder("tinyfam:any@features?quantize=true&width=4")
    assert enc.quantize and enc.layer == "features" and enc.dim == 8 * 4 * 4
    assert build_encoder("tinyfam:x", width=5).dim == 5  # Python keywords work as options too
    try:
        build_encoder("tinyfam:x?widht=3")
    except TypeError as e:
        assert "Did you mean: 'width'" in str(e)
    else:
        raise AssertionError("a misspelt option must be refused")


# -- a new target dataset: no featinv file touched -----------------------------------------------------
class Checkerboards(TargetSource):
    name = "checkers"

    def __init__(self, n: int = 3):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = ((torch.arange(8)[:, None] + torch.arange(8)[None] + i) % 2).float()[None]
        return self.item(i, label=i % 2, image=img)


def test_new_dataset_runs_through_the_harness(tmp_path, tiny_prior, tiny_encoder):
    module = InversionModule(prior=tiny_prior, encoder=tiny_encoder, progress=False,
                             methods=[{"preset": "unguided", "steps": 3}])
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[PredictionWriter(tmp_path / "out")])
    trainer.predict(module, datamodule=TargetDataModule([Checkerboards()], batch_size=2), return_predictions=False)
    recs = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["dataset"], r["index"], r["label"]) for r in recs) == [("checkers", i, i % 2) for i in range(3)]
