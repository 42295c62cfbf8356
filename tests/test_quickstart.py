"""The README's main job (configs/quickstart.yaml) end to end at reduced size, and the notebook."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_config_end_to_end(tmp_path):
    spec = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    spec["data"]["datasets"][0]["init_args"]["limit"] = 6
    spec["data"]["batch_size"] = 4
    spec["model"]["methods"] = [{"preset": "fast", "steps": 6, "recurrence": 2, "early_steps": 1,
                                 "early_recurrence": 3}, {"preset": "unguided", "steps": 6}]
    cfg = tmp_path / "quick.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "featinv.cli", "predict", "-c", str(cfg), "--output_dir", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "results.jsonl" in proc.stdout and "WandbLogger run" in proc.stdout  # tells where things are
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 6 * 2 and {r["method"] for r in recs} == {"fast", "unguided"}
    assert all(r["encoder"] == "zoo:digits-cnn@penultimate" and 0 <= r["label"] <= 9 for r in recs)
    assert all((out / r["image"]).is_file() and (out / r["target_image"]).is_file() for r in recs)
    assert len(list((out / "grids").glob("*.png"))) == 2
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert list((runs[0] / "files" / "media" / "table").glob("*.json"))
    assert (out / "config.yaml").is_file()  # LightningCLI saved the resolved config


def test_default_root_dir_is_an_alias_of_output_dir_and_startup_is_quiet(tmp_path):
    """Issue 16's friction: ``--trainer.default_root_dir`` works as ``--output_dir`` (a conflicting pair is
    refused in one line naming ``--output_dir``), and nothing featinv causes warns at start-up."""
    spec = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    spec.pop("output_dir")
    spec["data"]["datasets"][0]["init_args"]["limit"] = 2
    spec["data"]["batch_size"] = 2
    spec["model"]["methods"] = [{"preset": "fast", "steps": 3, "recurrence": 1}]
    cfg = tmp_path / "quick.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "featinv.cli", "predict", "-c", str(cfg), *args],
                              capture_output=True, text=True, env=env, timeout=600)

    proc = run("--trainer.default_root_dir", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "a" / "results.jsonl").read_text().splitlines()) == 2
    for noise in ("litlogger", "LeafSpec", "anonymous", "accelerate"):
        assert noise not in proc.stderr, (noise, proc.stderr[-2000:])
    proc = run("--trainer.default_root_dir", str(tmp_path / "b"), "--output_dir", str(tmp_path / "c"))
    assert proc.returncode != 0 and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("featinv: error:")]
    assert len(err) == 1 and "--output_dir" in err[0] and "alias" in err[0], proc.stderr[-2000:]


def _execute(name: str, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    monkeypatch.setenv("FEATINV_NB_TARGETS", "4")  # the kernel inherits the environment
    monkeypatch.setenv("FEATINV_NB_FAST", "1")
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    return text, images


def test_quickstart_notebook_executes(monkeypatch):
    text, images = _execute("01_quickstart.ipynb", monkeypatch)
    assert "final cosine" in text and "held-out ViT label agreement" in text
    assert len(images) == 2  # the grid and the distance curves


def test_methods_notebook_executes(monkeypatch):
    text, images = _execute("02_methods.ipynb", monkeypatch)
    for m in ("fast", "unguided", "pixel", "fourier", "deepinversion"):
        assert m in text
    assert len(images) == 1


def test_shapes_notebook_executes(monkeypatch):
    """notebooks/03_shapes.ipynb, reduced: both encoders invert, the grid shows, the agreement table prints."""
    text, images = _execute("03_shapes.ipynb", monkeypatch)
    assert "shapes-shape: final cosine" in text and "shapes-color: final cosine" in text
    assert "held-out linear-probe accuracy" in text and len(images) == 1


@pytest.mark.slow
def test_explain_notebook_executes(monkeypatch):
    """notebooks/04_explain.ipynb, reduced: DEPICT and DiffEx explain one classifier, with their oracles."""
    text, images = _execute("04_explain.ipynb", monkeypatch)
    assert "DEPICT ranking:" in text and "oracle ranking:" in text and "beam (DiffEx):" in text
    assert len(images) >= 2
