"""No silent wrong answer (issue 11): each input that once gave a wrong result with exit code 0 now
gives a correct result or one clear error."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import featinv
from featinv import results as R
from featinv.callbacks import PredictionWriter
from featinv.data import DigitsTargets, FeatureTargets, ImageTargets, TargetDataModule
from featinv.encoders import Encoder
from featinv.module import InversionModule

from conftest import TinyCNN

ROOT = Path(__file__).resolve().parents[1]
UNG = {"preset": "unguided", "steps": 3}


def predict(module, out, dm, **writer_kw):
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=out.parent,
                        callbacks=[PredictionWriter(out, **writer_kw)])
    trainer.predict(module, datamodule=dm, return_predictions=False)
    return [json.loads(x) for x in (out / R.RESULTS).read_text().splitlines()]


def other_encoder():
    torch.manual_seed(99)
    m = TinyCNN()
    m(torch.zeros(1, 1, 8, 8))
    return Encoder(m, "penultimate", input_size=8, in_chans=1, name="tiny-cnn-2")


# -- 1. resume and fingerprints ----------------------------------------------------------------------
def test_resume_refuses_another_configuration_and_new_run_keeps_both(tmp_path, tiny_prior, tiny_encoder):
    torch.save(torch.randn(3, 16), tmp_path / "f.pt")
    dm = lambda: TargetDataModule([FeatureTargets(str(tmp_path / "f.pt"))], batch_size=2)  # noqa: E731
    out = tmp_path / "out"
    first = predict(InversionModule(tiny_prior, tiny_encoder, [UNG], progress=False), out, dm())
    assert len(first) == 3 and all(r["fingerprint"] for r in first)
    with pytest.raises(R.RunConflictError, match="encoder_weights"):  # another encoder: refused, named
        predict(InversionModule(tiny_prior, other_encoder(), [UNG], progress=False), out, dm())
    with pytest.raises(R.RunConflictError, match=r"method 'unguided': steps 3 -> 4"):
        predict(InversionModule(tiny_prior, tiny_encoder, [{**UNG, "steps": 4}], progress=False), out, dm())
    assert [json.loads(x) for x in (out / R.RESULTS).read_text().splitlines()] == first  # untouched
    second = predict(InversionModule(tiny_prior, other_encoder(), [UNG], progress=False), out, dm(), new_run=True)
    assert (out / "run-2" / R.RESULTS).is_file() and len(second) == 3
    # the same configuration resumes: nothing recomputed, nothing duplicated
    again = predict(InversionModule(tiny_prior, tiny_encoder, [UNG], progress=False), out, dm())
    assert again == first


def test_changed_targets_are_recomputed_and_skipped_inputs_retried(tmp_path, tiny_prior, tiny_encoder):
    feats = torch.randn(4, 16)
    feats[2, 0] = float("nan")
    torch.save(feats, tmp_path / "f.pt")
    out = tmp_path / "out"
    dm = lambda: TargetDataModule([FeatureTargets(str(tmp_path / "f.pt"))], batch_size=4)  # noqa: E731
    module = lambda: InversionModule(tiny_prior, tiny_encoder, [UNG], progress=False, on_bad_target="skip")  # noqa
    before = {r["index"]: r for r in predict(module(), out, dm())}
    assert "skipped" in before[2] and "skipped" not in before[1]
    feats[1] = torch.randn(16)  # target 1 changed, target 2 repaired
    feats[2, 0] = 0.5
    torch.save(feats, tmp_path / "f.pt")
    after = {r["index"]: r for r in predict(module(), out, dm())}
    assert len((out / R.RESULTS).read_text().splitlines()) == 4  # compacted: one record per key
    assert after[0] == before[0] and after[3] == before[3]  # unchanged targets were not recomputed
    assert after[1]["fingerprint"] != before[1]["fingerprint"] and after[1]["final_cos"] != before[1]["final_cos"]
    assert "skipped" not in after[2] and math.isfinite(after[2]["final_cos"])


def test_config_yaml_is_never_silently_replaced(tmp_path):
    base = ["predict", "-c", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(tmp_path / "o"),
            "--data.datasets.init_args.limit", "2", "--model.methods", '[{"preset": "unguided", "steps": 2}]',
            "--wandb.mode", "disabled", "--trainer.enable_progress_bar", "false"]
    for extra in ([], ["--data.batch_size", "1"]):
        proc = subprocess.run([sys.executable, "-m", "featinv.cli", *base, *extra], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "batch_size: 8" in (tmp_path / "o" / "config.yaml").read_text()
    assert "batch_size: 1" in (tmp_path / "o" / "config.2.yaml").read_text()


# -- 2. settings that gave NaN or crashed are refused, with the allowed range -------------------------
@pytest.mark.parametrize("override,match", [
    (dict(steps=0), r"steps=0 is invalid; it must be an integer >= 1"),
    (dict(steps=-3), r"steps=-3 is invalid"),
    (dict(weight=float("nan")), r"weight=nan is invalid; it must be a finite number >= 0"),
    (dict(recurrence=0), r"recurrence=0 is invalid; it must be an integer >= 1"),
    (dict(eta=1.5), r"eta=1.5 is invalid; it must be in \[0, 1\]"),
    (dict(clamp_k=0), r"clamp_k=0 is invalid"),
    (dict(schedule="cubic"), r"schedule='cubic' is invalid; choose from"),
    (dict(window=[0.5, 0.2]), r"window=\(0.5, 0.2\) is invalid"),
    (dict(decode_clamp="soft"), r"decode_clamp='soft' is invalid"),
])
def test_invalid_method_settings_refused_at_construction(override, match):
    with pytest.raises(ValueError, match=match):
        featinv.get_method("fast", **override)


def test_invalid_baseline_and_dataset_options_refused():
    with pytest.raises(ValueError, match=r"lr=-1.0 is invalid"):
        featinv.get_method("pixel", lr=-1.0)
    with pytest.raises(ValueError, match=r"steps=0 is invalid"):
        featinv.get_method("fourier", steps=0)
    with pytest.raises(ValueError, match=r"limit=-1 is invalid; it must be an integer >= 1 or null"):
        DigitsTargets(limit=-1)
    with pytest.raises(ValueError, match=r"split='valid' is invalid"):
        DigitsTargets(split="valid")
    with pytest.raises(ValueError, match=r"batch_size=0 is invalid"):
        TargetDataModule([DigitsTargets(limit=2)], batch_size=0)


def test_steps_beyond_the_prior_are_refused_not_clamped(tiny_prior, tiny_encoder):
    with pytest.raises(ValueError, match="steps=1000 exceeds the prior's 100 training timesteps"):
        featinv.invert(torch.randn(1, 16), prior=tiny_prior, encoder=tiny_encoder, method="shirahama2025")


def test_results_jsonl_never_holds_nan(tmp_path):
    R.append_records(tmp_path / "r.jsonl", [{"dataset": "d", "index": 0, "method": "m", "seed": 0,
                                             "final_cos": float("nan"), "distances": [1.0, float("inf")]}])
    line = (tmp_path / "r.jsonl").read_text()
    rec = json.loads(line)  # valid JSON: no bare NaN token
    assert "NaN" not in line and "Infinity" not in line
    assert rec["final_cos"] is None and rec["distances"] == [1.0, None] and "final_cos" in rec["error"]


def test_non_finite_images_are_an_error_not_a_png(tiny_prior, tiny_encoder):
    class NaNMethod:
        name = "nan"

        def __call__(self, prior, encoder, target, generators, **kw):
            from featinv.contract import SampleOutput

            img = torch.full((len(generators), 1, 8, 8), float("nan"))
            z = torch.zeros(len(generators), dtype=torch.long)
            return SampleOutput(img, img, torch.zeros(len(generators), 1), torch.zeros(len(generators)), z, z, z)

    with pytest.raises(RuntimeError, match="non-finite images"):
        featinv.invert(torch.randn(2, 16), prior=tiny_prior, encoder=tiny_encoder, method=NaNMethod())


# -- 3. locking and unique counts -------------------------------------------------------------------------
def test_a_second_run_into_a_locked_directory_refuses(tmp_path, tiny_prior, tiny_encoder):
    torch.save(torch.randn(2, 16), tmp_path / "f.pt")
    out = tmp_path / "out"
    code = ("import fcntl, os, sys, time; p = sys.argv[1]; os.makedirs(os.path.dirname(p), exist_ok=True); "
            "fd = os.open(p, os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
            "os.write(fd, b'pid 4242 on testhost'); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out / R.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(R.OutputDirInUseError, match="in use by pid 4242 on testhost"):
            predict(InversionModule(tiny_prior, tiny_encoder, [UNG], progress=False), out,
                    TargetDataModule([FeatureTargets(str(tmp_path / "f.pt"))]))
    finally:
        holder.kill()
        holder.wait()
    assert len(predict(InversionModule(tiny_prior, tiny_encoder, [UNG], progress=False), out,
                       TargetDataModule([FeatureTargets(str(tmp_path / "f.pt"))]))) == 2  # released: runs


def test_summary_counts_unique_records():
    rec = {"dataset": "d", "index": 0, "method": "m", "seed": 0, "final_cos": 0.5, "best_cos": 0.5, "nfe": 1,
           "seconds": 1.0}
    table = R.summary_table([rec, dict(rec, final_cos=0.7), dict(rec, index=1, final_cos=0.9)])
    row = table.splitlines()[1].split()
    assert row[:3] == ["d", "m", "2"] and float(row[3]) == pytest.approx(0.8)  # last record of index 0 wins


# -- 8. inputs that loaded wrong -----------------------------------------------------------------------------
def test_float_tiff_loads_as_its_values(tmp_path):
    arr = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(arr, mode="F").save(tmp_path / "x.tif")
    img = ImageTargets(str(tmp_path), channels=1)[0]["image"]
    torch.testing.assert_close(img[0], torch.from_numpy(arr))


def test_degenerate_targets_refused_or_warned(tiny_prior, tiny_encoder):
    kw = dict(prior=tiny_prior, encoder=tiny_encoder, method="unguided", steps=2)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] are all zero"):
        featinv.invert(torch.stack([torch.randn(16), torch.zeros(16)]), **kw)
    with pytest.raises(ValueError, match="overflow float32"):
        featinv.invert(torch.randn(2, 16) * 1e30, **kw)
    with pytest.warns(UserWarning, match="far from"):
        featinv.invert(torch.randn(2, 16) * 1e6, **kw)


# -- crashes without context: one line naming the file and the fix -------------------------------------------
def test_bad_files_give_one_clear_error(tmp_path, monkeypatch):
    for suffix in (".npy", ".pt", ".safetensors"):
        (tmp_path / f"empty{suffix}").write_bytes(b"")
        with pytest.raises(ValueError, match=rf"empty{suffix}' is empty \(0 bytes\)"):
            FeatureTargets(str(tmp_path / f"empty{suffix}"))
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read feature file .*garbage.pt"):
        FeatureTargets(str(tmp_path / "garbage.pt"))
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(tmp_path / "imgs" / "b.png")
    with pytest.raises(ValueError, match=r"different sizes .*set `size`"):
        ImageTargets(str(tmp_path / "imgs"))
    assert ImageTargets(str(tmp_path / "imgs"), size=4)[1]["image"].shape == (3, 4, 4)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5)  # 4x4 and 6x5 are now "bombs" (> 2x the limit)
    with pytest.raises(ValueError, match="decompression-bomb limit"):
        ImageTargets(str(tmp_path / "imgs"), size=4)[0]


def test_corrupt_line_named_and_skippable(tmp_path):
    good = {"dataset": "d", "index": 0, "method": "m", "seed": 0}
    (tmp_path / R.RESULTS).write_text(json.dumps(good) + "\n{oops\n" + json.dumps(dict(good, index=1)) + "\n")
    with pytest.raises(R.CorruptResultsError, match=r"results.jsonl:2: .*--skip_corrupt"):
        R.read_dir(tmp_path)
    assert [r["index"] for r in R.read_dir(tmp_path, skip_corrupt=True)] == [0, 1]


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "featinv.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **kw.pop("env", {})}, **kw)


def test_user_errors_print_one_line(tmp_path):
    base = ["predict", "-c", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(tmp_path)]
    proc = _cli([*base, "--model.methods", '["fsat"]'])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("featinv: error:")]
    assert len(errors) == 1 and "unknown method 'fsat'" in errors[0] and "Did you mean: 'fast'" in errors[0]
    proc = _cli([*base, "--model.methods", '["fsat"]', "--debug"])
    assert "Traceback" in proc.stderr


def test_sigterm_stops_promptly_and_keeps_results(tmp_path):
    out = tmp_path / "o"
    args = ["predict", "-c", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(out), "--data.batch_size", "1",
            "--model.methods", '[{"preset": "fast", "steps": 50}]', "--wandb.mode", "disabled"]
    proc = subprocess.Popen([sys.executable, "-m", "featinv.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / R.RESULTS).exists() and (out / R.RESULTS).read_text()):
        time.sleep(0.5)
    assert (out / R.RESULTS).exists(), "no batch finished"
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    proc.wait(timeout=60)
    assert time.time() - t0 < 30 and proc.returncode != 0
    n = len(R.read_dir(out))
    assert 1 <= n < 8
    assert not R.OutputDirLock(out).acquire().release()  # the lock went with the process


# -- faithfulness ------------------------------------------------------------------------------------------
def test_hook_takes_the_last_call_of_a_reused_module():
    """torchvision ResNet blocks call their `relu` twice (BasicBlock): the feature is the block's output."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    m = resnet18().eval()
    x = torch.rand(2, 3, 32, 32)
    last = Encoder(m, "layer1.0.relu")(x)
    first = Encoder(m, "layer1.0.relu", call=0)(x)
    block = Encoder(m, "layer1.0")(x)
    torch.testing.assert_close(last, block)
    assert not torch.allclose(first, block)
    with pytest.raises(ValueError, match="runs 2 time"):
        Encoder(m, "layer1.0.relu", call=2)(x)


def test_same_config_seed_and_batch_give_bit_identical_results(tiny_prior, tiny_encoder):
    t = tiny_encoder(torch.rand(3, 1, 8, 8)).detach()
    kw = dict(prior=tiny_prior, encoder=tiny_encoder, method="fast", steps=6, recurrence=2, early_steps=1, seed=4)
    a, b = featinv.invert(t, **kw), featinv.invert(t, **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.distances, b.distances)
