"""Evaluators in every run and `featinv report` over results directories (issue 16)."""
import os
import subprocess
import sys

import lightning as L
import pytest

from featinv import results as R
from featinv.callbacks import PredictionWriter
from featinv.data import DigitsTargets, TargetDataModule
from featinv.module import InversionModule
from featinv.report import compare, load, to_markdown


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "out"
    module = InversionModule("zoo:digits-ddpm", "zoo:digits-cnn", progress=False,
                             methods=[{"preset": "fast", "steps": 8, "recurrence": 1, "early_steps": 0},
                                      {"preset": "unguided", "steps": 8}],
                             evaluators=["vit=zoo:digits-vit@logits", "zoo:digits-cnn@logits"])
    L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, default_root_dir=out.parent,
              callbacks=[PredictionWriter(out)]).predict(
        module, datamodule=TargetDataModule([DigitsTargets(limit=6)], batch_size=6), return_predictions=False)
    return out


def test_evaluator_scores_are_in_every_record(run_dir):
    recs = R.read_dir(run_dir)
    assert len(recs) == 12
    for r in recs:
        assert r["eval/vit/agree"] in (0.0, 1.0) and -1 <= r["eval/vit/cos"] <= 1 and 0 < r["eval/vit/conf"] <= 1
        assert "eval/digits-cnn@logits/agree" in r
    fast = [r for r in recs if r["method"] == "fast"]
    ung = [r for r in recs if r["method"] == "unguided"]
    # guided outputs are read as the target's digit by the held-out ViT far more often than the prior's
    assert sum(r["eval/vit/agree"] for r in fast) > sum(r["eval/vit/agree"] for r in ung) + 2


def test_report_table_with_retention(run_dir, tmp_path):
    cols, rows = compare(load([run_dir]))
    by = {r["method"]: r for r in rows}
    assert by["fast"]["n"] == by["unguided"]["n"] == 6 and by["unguided"]["retention/vit/agree"] == 0.0
    a, c = by["fast"]["eval/vit/agree"], by["unguided"]["eval/vit/agree"]
    assert by["fast"]["retention/vit/agree"] == pytest.approx((a - c) / (1 - c))
    assert "| fast |" in to_markdown(cols, rows)
    proc = subprocess.run([sys.executable, "-m", "featinv.cli", "report", str(run_dir), "--out", str(tmp_path / "t")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    csv = (tmp_path / "t.csv").read_text().splitlines()
    assert csv[0].startswith("dataset,encoder,method,n,final_cos") and len(csv) == 3
    assert (tmp_path / "t.md").read_text().count("| digits-test |") == 2
    bad = subprocess.run([sys.executable, "-m", "featinv.cli", "report", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "has no results.jsonl" in bad.stderr


def test_reader_evaluator_scores_each_factor_and_their_mean():
    import torch

    from featinv.evaluators import ReaderEvaluator

    class Reader:  # reads "shape" from channel 0's sign and "color" from channel 1's
        def read(self, x):
            return {k: ((x[:, c].mean((1, 2)) > 0).long(), torch.ones(len(x))) for k, c in (("shape", 0), ("color", 1))}

    out, tgt = torch.ones(3, 2, 4, 4), torch.ones(3, 2, 4, 4)
    tgt[0, 1], tgt[1] = -1, -1   # target 0 differs in colour, target 1 in both, target 2 in neither
    got = ReaderEvaluator(Reader(), "reader")(out, tgt)
    assert got["shape"].tolist() == [1, 0, 1] and got["color"].tolist() == [0, 0, 1]
    assert got["mean"].tolist() == [0.5, 0.0, 1.0] and got["shape_value"].tolist() == [1, 1, 1]
    assert "mean" not in ReaderEvaluator(Reader(), "reader")(out)   # no target image: no agreement
