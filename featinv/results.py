"""The output directory: file layout, records, fingerprints, resume, locking and the summary.

Layout of ``<output_dir>``::

    results.jsonl            one JSON record per (dataset, index, method, seed), appended whole
    results.rank<k>.jsonl    the same, per rank, while a multi-process run is in flight
    run.json                 what produced the records (prior, encoder, seed, method configs, W&B id)
    samples/<dataset>/<index>_<method>.png, grids/, config.yaml, wandb/
    .featinv.lock            held (flock) by the run writing here

A record's ``key`` is (dataset, index, method, seed). Its ``fingerprint`` hashes everything that
determines it: the run's identity (prior and encoder specs and weight digests, seed), the method's
full configuration and the target's content. Resume skips a key only if its fingerprint matches;
the last record of a key wins (older ones are dropped when the file is compacted).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["RESULTS", "RUN_FILE", "LOCK_FILE", "SAMPLES", "GRIDS", "KEY", "record_key", "CorruptResultsError",
           "read_records", "read_dir", "latest", "append_records", "merge_rank_files", "compact", "summary_table",
           "digest", "module_digest", "tensor_digest", "OutputDirLock", "OutputDirInUseError", "RunConflictError",
           "check_run", "read_run", "update_run", "sample_path", "finite_record"]

RESULTS = "results.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = ".featinv.lock"
SAMPLES = "samples"
GRIDS = "grids"
KEY = ("dataset", "index", "method", "seed")


def record_key(rec: dict) -> tuple:
    """(dataset, index, method, seed): the identity of a record."""
    return rec["dataset"], int(rec["index"]), rec["method"], int(rec["seed"])


def sample_path(dataset: str, index: int, method: str, suffix: str = "") -> str:
    """Relative path of a sample PNG."""
    return f"{SAMPLES}/{dataset}/{index:06d}_{method}{suffix}.png"


# -- reading and writing ---------------------------------------------------------------------------
class CorruptResultsError(ValueError):
    """A line in a results file is not a JSON record."""


def read_records(path: Path, *, repair: bool = False, skip_corrupt: bool = False) -> list[dict]:
    """Records of one results file. A torn last line (a kill mid-write) is ignored, and cut off
    the file with ``repair``; a corrupt line elsewhere raises ``CorruptResultsError`` naming the
    file and line, unless ``skip_corrupt`` (then it is reported on stderr and skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(data))
    out = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            record_key(rec)
        except (ValueError, KeyError, TypeError) as e:
            msg = f"{path}:{n}: not a featinv record ({type(e).__name__}: {str(e)[:80]})"
            if skip_corrupt:
                print(f"featinv: skipping {msg}", file=sys.stderr)
                continue
            raise CorruptResultsError(f"{msg}; fix or delete that line, or re-run with --skip_corrupt true "
                                      "to skip it") from None
        out.append(rec)
    return out


def read_dir(output_dir: Path, *, repair: bool = False, skip_corrupt: bool = False) -> list[dict]:
    """Records of results.jsonl and any rank files, in file order."""
    output_dir = Path(output_dir)
    files = [output_dir / RESULTS] + sorted(output_dir.glob("results.rank*.jsonl"))
    return [r for f in files for r in read_records(f, repair=repair, skip_corrupt=skip_corrupt)]


def latest(records: Iterable[dict]) -> dict[tuple, dict]:
    """key -> the last record with that key."""
    return {record_key(r): r for r in records}


def finite_record(rec: dict) -> dict:
    """Replace NaN/inf floats by null and name them in ``error``: results.jsonl stays valid JSON
    and a non-finite number is never silent."""
    bad = []

    def clean(k, v):
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(k)
            return None
        if isinstance(v, list):
            return [clean(k, x) for x in v]
        return v

    out = {k: clean(k, v) for k, v in rec.items()}
    if bad:
        out["error"] = f"non-finite values in {sorted(set(bad))}"
    return out


def append_records(path: Path, records: list[dict]) -> None:
    """Append whole lines, flushed and fsync'ed (a kill leaves at most a torn last line)."""
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(finite_record(r), allow_nan=False) + "\n" for r in records)
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _rewrite(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(finite_record(r), allow_nan=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def merge_rank_files(output_dir: Path) -> int:
    """Fold results.rank*.jsonl into results.jsonl (last record per key wins); returns the number
    of records. Safe to call at any time under the directory's lock (e.g. after a failed DDP run)."""
    output_dir = Path(output_dir)
    parts = sorted(output_dir.glob("results.rank*.jsonl"))
    if not parts:
        return len(latest(read_records(output_dir / RESULTS)))
    return compact(output_dir, extra=parts)


def compact(output_dir: Path, extra: list[Path] = ()) -> int:
    """Rewrite results.jsonl with one record per key (the last), folding in ``extra`` files."""
    output_dir = Path(output_dir)
    main = output_dir / RESULTS
    recs = read_records(main, repair=True) + [r for p in extra for r in read_records(p, repair=True)]
    keep = list(latest(recs).values())
    if len(keep) != len(recs) or extra:
        _rewrite(main, keep)
    for p in extra:
        p.unlink()
    return len(keep)


# -- fingerprints ----------------------------------------------------------------------------------
def digest(obj) -> str:
    """A short, stable hash of a JSON-able object."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=10).hexdigest()


def tensor_digest(t) -> str:
    """Hash of a tensor's dtype, shape and bytes (or of a string)."""
    h = hashlib.blake2b(digest_size=10)
    if isinstance(t, str):
        h.update(t.encode())
    else:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer of a module (names, shapes, values); cached on it."""
    cached = getattr(module, "_featinv_digest", None)
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=10)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(tensor_digest(t).encode())
    value = h.hexdigest()
    try:
        object.__setattr__(module, "_featinv_digest", value)
    except AttributeError:  # pragma: no cover
        pass
    return value


# -- the run file and conflicts --------------------------------------------------------------------
class RunConflictError(ValueError):
    """The output directory holds records written by a different configuration."""


def check_run(output_dir: Path, identity: dict, methods: dict[str, dict], *, new_run: bool = False) -> Path:
    """Compare this run with the one that wrote ``output_dir`` and record it in run.json.

    ``identity``: prior, encoder (specs, weight digests) and seed; ``methods``: name -> config.
    The same identity and no method whose configuration changed: resume in place (new methods are
    added). Otherwise refuse with the differences, or with ``new_run`` continue in a fresh
    ``<output_dir>/run-<n>``. Returns the directory to write to.
    """
    output_dir = Path(output_dir)
    run_file = output_dir / RUN_FILE
    if run_file.exists():
        old = json.loads(run_file.read_text())
        diffs = [f"{k}: {old['identity'].get(k)!r} -> {identity.get(k)!r}"
                 for k in sorted(set(old["identity"]) | set(identity)) if old["identity"].get(k) != identity.get(k)]
        for name, cfg in methods.items():
            prev = old["methods"].get(name)
            if prev is not None and prev != cfg:
                changed = sorted(k for k in set(prev) | set(cfg) if prev.get(k) != cfg.get(k))
                diffs.append(f"method {name!r}: " + ", ".join(f"{k} {prev.get(k)!r} -> {cfg.get(k)!r}"
                                                             for k in changed))
        if diffs:
            if new_run:
                n = 2
                while (output_dir / f"run-{n}").exists():
                    n += 1
                return check_run(output_dir / f"run-{n}", identity, methods)
            raise RunConflictError(f"{output_dir} holds results of a different configuration ("
                                   + "; ".join(diffs) + "): choose another --output_dir, or pass "
                                   "--resume new_run to write into a new sub-run")
        run = {**old, "methods": {**old["methods"], **methods}}
    else:
        if (output_dir / RESULTS).exists() and read_records(output_dir / RESULTS):
            if new_run:
                return check_run(output_dir / "run-2", identity, methods)
            raise RunConflictError(f"{output_dir} holds results without a {RUN_FILE} (an older featinv, or "
                                   "written by hand): their configuration is unknown; choose another "
                                   "--output_dir or pass --resume new_run")
        run = {"identity": identity, "methods": methods, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=1, sort_keys=True))
    os.replace(tmp, run_file)
    return output_dir


def read_run(output_dir: Path) -> dict:
    """run.json of a directory ({} if absent)."""
    run_file = Path(output_dir) / RUN_FILE
    return json.loads(run_file.read_text()) if run_file.exists() else {}


def update_run(output_dir: Path, **fields) -> dict:
    """Set top-level fields of run.json (e.g. the W&B run id)."""
    run_file = Path(output_dir) / RUN_FILE
    run = json.loads(run_file.read_text()) if run_file.exists() else {}
    run.update(fields)
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=1, sort_keys=True))
    os.replace(tmp, run_file)
    return run


# -- locking ---------------------------------------------------------------------------------------
class OutputDirInUseError(RuntimeError):
    """Another featinv run holds the output directory."""


class OutputDirLock:
    """An exclusive, non-blocking ``flock`` on ``<output_dir>/.featinv.lock`` naming its holder.
    The kernel releases it when the process dies, so a killed run never leaves a stale lock."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd = None

    def acquire(self) -> "OutputDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputDirInUseError(f"{self.path.parent} is in use by {holder}: wait for that run to finish, "
                                      "or choose another --output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')} "
                     f"({' '.join(sys.argv)[:200]})".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()


# -- the summary -----------------------------------------------------------------------------------
def summary_table(records: Iterable[dict], extra: Iterable[str] = ()) -> str:
    """Per (dataset, method): unique records, mean final/best cosine, NFE, s/img (+ ``extra`` means)."""
    recs = list(latest(records).values())
    agg, skipped = defaultdict(list), 0
    for r in recs:
        if "skipped" in r:
            skipped += 1
            continue
        agg[(r["dataset"], r["method"])].append(r)
    extra = [k for k in extra if any(k in r for r in recs)]
    head = f"{'dataset':<16}{'method':<16}{'n':>5}{'final_cos':>11}{'best_cos':>10}{'nfe':>7}{'s/img':>8}"
    lines = [head + "".join(f"{k.removeprefix('eval/')[-16:]:>17}" for k in extra)]

    def mean(rs, k):
        v = [r[k] for r in rs if isinstance(r.get(k), (int, float))]
        return sum(v) / len(v) if v else float("nan")

    for (d, m), rs in sorted(agg.items()):
        lines.append(f"{d[:15]:<16}{m[:15]:<16}{len(rs):>5}{mean(rs, 'final_cos'):>11.4f}{mean(rs, 'best_cos'):>10.4f}"
                     f"{mean(rs, 'nfe'):>7.0f}{mean(rs, 'seconds'):>8.3f}"
                     + "".join(f"{mean(rs, k):>17.4f}" for k in extra))
    if skipped:
        lines.append(f"{skipped} record(s) skipped (see 'skipped' in {RESULTS})")
    return "\n".join(lines)
