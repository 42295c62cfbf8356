"""The Lightning layer end to end on tiny models: output contract, W&B run, several datasets."""
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from featinv.callbacks import RunLogger, PredictionWriter
from featinv.data import FeatureTargets, ImageTargets, TargetDataModule
from featinv.module import InversionModule

FAST = dict(steps=6, recurrence=2, early_steps=1, early_recurrence=3)
FIELDS = {"dataset", "index", "label", "method", "encoder", "layer", "seed", "final_cos", "final_l2", "best_cos",
          "nfe", "seconds", "image", "distances"}


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8), "L").save(tmp_path / "imgs" / cls / f"{i}.png")
    return tmp_path / "imgs"


@pytest.fixture
def module(tiny_prior, tiny_encoder):
    return InversionModule(prior=tiny_prior, encoder=tiny_encoder, progress=False,
                           methods=[{"preset": "fast", **FAST}, {"preset": "unguided", "steps": 6}])


def _trainer(tmp_path, logger, **kw):
    return L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=logger, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                     callbacks=[PredictionWriter(tmp_path / "out"), RunLogger()], **kw)


def test_two_datasets_output_contract_and_offline_wandb(tmp_path, image_dir, module, tiny_encoder):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    torch.save({"features": torch.randn(5, tiny_encoder.dim), "labels": torch.arange(5)}, tmp_path / "f.pt")
    dm = TargetDataModule([ImageTargets(str(image_dir), channels=1), FeatureTargets(str(tmp_path / "f.pt"), name="feats")],
                          batch_size=4)
    logger = WandbLogger(save_dir=str(tmp_path), project="featinv-test", mode="offline")
    try:
        _trainer(tmp_path, logger).predict(module, datamodule=dm, return_predictions=False)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    out = tmp_path / "out"
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == (6 + 5) * 2
    assert {(r["dataset"], r["index"], r["method"]) for r in recs} == {
        (d, i, m) for d, n in (("imgs", 6), ("feats", 5)) for i in range(n) for m in ("fast", "unguided")}
    for r in recs:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert len(r["distances"]) == 6 and (out / r["image"]).is_file()
        assert -1 <= r["final_cos"] <= 1 and r["nfe"] == (6 * 2 + 1 * 1 if r["method"] == "fast" else 6)
    assert {r["label"] for r in recs if r["dataset"] == "imgs"} == {0, 1}
    assert all((out / r["target_image"]).is_file() for r in recs if r["dataset"] == "imgs")
    assert len(list((out / "grids").glob("*.png"))) == 2 + 2  # 6 images and 5 features in batches of 4

    # read the offline run back
    summary = json.loads(subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json",
                                         str(run_dir)], capture_output=True, text=True, check=True).stdout)
    assert summary["summary"]["final_cos/imgs/fast"] == pytest.approx(
        np.mean([r["final_cos"] for r in recs if r["dataset"] == "imgs" and r["method"] == "fast"]), abs=1e-6)
    records = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                             capture_output=True, text=True, check=True).stdout
    history = [json.loads(line) for line in records.splitlines() if '"history"' in line]
    assert sum("distance/feats/fast" in json.dumps(h) for h in history) == 6  # one point per sampling step
    media = run_dir / "files" / "media"
    assert list(media.glob("images/grids/*.png")) and list(media.glob("table/*.table.json"))


def test_csv_logger_and_refusal_of_inference_mode(tmp_path, module, tiny_encoder):
    from lightning.pytorch.loggers import CSVLogger

    torch.save(torch.randn(3, tiny_encoder.dim), tmp_path / "f.pt")
    dm = TargetDataModule([FeatureTargets(str(tmp_path / "f.pt"))], batch_size=3)
    _trainer(tmp_path, CSVLogger(tmp_path / "csv")).predict(module, datamodule=dm, return_predictions=False)
    metrics = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "distance/f/fast" in metrics and "final_cos/f/unguided" in metrics
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        L.Trainer(accelerator="cpu", inference_mode=True, logger=False, enable_progress_bar=False).predict(
            module, datamodule=dm, return_predictions=False)


def test_bad_targets_raise_or_are_recorded_as_skipped(tmp_path, tiny_prior, tiny_encoder):
    feats = torch.randn(5, tiny_encoder.dim)
    feats[3, 0] = float("nan")
    torch.save(feats, tmp_path / "f.pt")
    dm = TargetDataModule([FeatureTargets(str(tmp_path / "f.pt"))], batch_size=5)
    methods = [{"preset": "fast", **FAST}, {"preset": "unguided", "steps": 6}]
    strict = InversionModule(prior=tiny_prior, encoder=tiny_encoder, progress=False, methods=methods)
    with pytest.raises(ValueError, match=r"NaN/inf for \[\('f', 3\)\].*on_bad_target=skip"):
        _trainer(tmp_path, False).predict(strict, datamodule=dm, return_predictions=False)
    lenient = InversionModule(prior=tiny_prior, encoder=tiny_encoder, progress=False, methods=methods,
                              on_bad_target="skip")
    _trainer(tmp_path, False).predict(lenient, datamodule=dm, return_predictions=False)
    recs = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 5 * 2
    skipped = [r for r in recs if "skipped" in r]
    assert {(r["index"], r["method"]) for r in skipped} == {(3, "fast"), (3, "unguided")}
    assert all(np.isfinite(r["final_cos"]) for r in recs if "skipped" not in r)
    images = list((tmp_path / "out" / "samples").rglob("*.png"))
    assert images and not [p for p in images if "000003" in p.name]  # no image for a skipped target
