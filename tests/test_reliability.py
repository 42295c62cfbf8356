"""Resume after a kill, torn lines, determinism across batch sizes, and DDP with 2 CPU processes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "run_tiny.py"


def run(out, *args, check=True):
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *map(str, args)], capture_output=True, text=True,
                          check=check, timeout=600)


def records(out):
    lines = (Path(out) / "out" / "results.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def key(r):
    return r["dataset"], r["index"], r["method"]


def test_leftover_rank_files_are_merged_and_their_records_kept(tmp_path):
    """A multi-process run that died leaves results.rank*.jsonl: the next run folds them in first."""
    run(tmp_path / "a", "--n", 4)
    out = tmp_path / "a" / "out"
    recs = records(tmp_path / "a")
    sentinel = dict(recs[1], final_cos=0.123456)  # same key and fingerprint: must be kept, not recomputed
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:1]))
    (out / "results.rank1.jsonl").write_text(json.dumps(sentinel) + "\n")
    run(tmp_path / "a", "--n", 4)
    after = {key(r): r for r in records(tmp_path / "a")}
    assert len(after) == len(records(tmp_path / "a")) == 8 and not list(out.glob("results.rank*.jsonl"))
    assert after[key(sentinel)]["final_cos"] == 0.123456


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    killed = run(tmp_path / "a", "--kill-after", 2, check=False)
    assert killed.returncode == 3, killed.stderr[-2000:]
    partial = records(tmp_path / "a")
    assert len(partial) == 2 * 2 * 2  # 2 batches x 2 targets x 2 methods written before the kill
    with open(tmp_path / "a" / "out" / "results.jsonl", "a") as f:
        f.write('{"dataset": "f", "index": 9, "meth')  # a torn line, as a kill mid-write leaves
    run(tmp_path / "a")
    done = records(tmp_path / "a")
    assert len(done) == len({key(r) for r in done}) == 10 * 2
    assert partial == done[: len(partial)]  # nothing written before the kill was changed

    run(tmp_path / "b", "--batch-size", 5)  # one uninterrupted run, other batch size
    full = {key(r): r for r in records(tmp_path / "b")}
    for r in done:  # identical numbers whatever the batching and the interruption
        assert r["distances"] == pytest.approx(full[key(r)]["distances"], abs=1e-5)
        assert r["final_cos"] == pytest.approx(full[key(r)]["final_cos"], abs=1e-5)


@pytest.mark.slow
def test_ddp_two_cpu_processes_every_target_exactly_once(tmp_path):
    proc = run(tmp_path, "--devices", 2, "--batch-size", 2, "--n", 7, "--wandb")  # 7 targets: uneven on 2 ranks
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    recs = records(tmp_path)
    keys = [key(r) for r in recs]
    assert len(keys) == len(set(keys)) == 7 * 2
    assert {k[1] for k in keys} == set(range(7))
    assert not list((tmp_path / "out").glob("results.rank*.jsonl"))
    # every rank's grid survives: rank 0 has targets 0 2 4 6, rank 1 has 1 3 5, in batches of 2
    assert sorted(p.name for p in (tmp_path / "out" / "grids").glob("*.png")) == [
        f"f_{i:06d}.png" for i in (0, 1, 4, 5)]
    # the W&B summary (logged by rank 0 only) covers both ranks' targets
    run_dir = [ln.split(" ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("WANDB_DIR")][0]
    summary = json.loads(subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json",
                                         run_dir], capture_output=True, text=True, check=True).stdout)["summary"]
    assert summary["n/f/fast"] == 7 and summary["final_cos/f/fast"] == pytest.approx(
        sum(r["final_cos"] for r in recs if r["method"] == "fast") / 7, abs=1e-6)
    single = tmp_path / "single"
    single.mkdir()
    (single / "targets.pt").write_bytes((tmp_path / "targets.pt").read_bytes())  # the same 7 targets
    run(single, "--batch-size", 3)
    one = {key(r): r for r in records(single)}
    for r in recs:  # identical numbers whatever the number of ranks
        assert r["distances"] == pytest.approx(one[key(r)]["distances"], abs=1e-5)
