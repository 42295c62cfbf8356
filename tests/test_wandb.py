"""W&B across resume and when the server cannot be reached (issue 11, items 6 and 7)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from featinv import results as R

ROOT = Path(__file__).resolve().parents[1]


def _summary(run_dir):
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["summary"]


def _run(out, limit, env=None, extra=()):
    args = ["predict", "-c", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(out),
            "--data.datasets.init_args.limit", str(limit), "--model.methods", '[{"preset": "unguided", "steps": 3}]',
            "--trainer.enable_progress_bar", "false", *extra]
    return subprocess.run([sys.executable, "-m", "featinv.cli", *args], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}.items()
                               if v is not None})


def test_resume_continues_the_wandb_run_and_summarises_every_record(tmp_path):
    out = tmp_path / "o"
    for limit in (2, 5):
        proc = _run(out, limit)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "wandb sync" in proc.stdout  # how to upload the offline run
    run_id = R.read_run(out)["wandb_id"]
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # one W&B run, resumed
    summary = _summary(runs[-1])
    recs = R.read_dir(out)
    log = [json.loads(x) for x in subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                                                  str(runs[-1])], capture_output=True, text=True, check=True
                                                 ).stdout.splitlines()]
    config = {k: v for rec in log if rec["type"] == "config" for k, v in rec["config"]["update"].items()}
    assert len(config["git_commit"]) >= 7 and config["model"]["methods"][0]["steps"] == 3
    live = [rec for rec in log if rec["type"] == "history" and "running/final_cos" in json.dumps(rec)]
    assert len(live) == 1  # logged as the (one, batch_size 8) new batch finished, not only at the end
    assert summary["n/digits-test/unguided"] == 5 == len(recs)  # not only the 3 new records
    assert summary["final_cos/digits-test/unguided"] == pytest.approx(sum(r["final_cos"] for r in recs) / 5, abs=1e-6)


@pytest.mark.slow
def test_unreachable_server_falls_back_to_offline_and_keeps_results(tmp_path):
    env = {"WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_MODE": None}
    proc = _run(tmp_path / "o", 2, env=env, extra=["--wandb.mode", "online", "--wandb.init_timeout", "5"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "logging offline instead" in proc.stderr
    assert len(R.read_dir(tmp_path / "o")) == 2 and list((tmp_path / "o" / "wandb").glob("offline-run-*"))
