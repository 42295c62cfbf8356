"""A small mutation check for the sampler: break one line at a time, run the sampler's tests, and
report whether they notice (issue 11). Every mutant must be killed.

    python tools/mutants.py                  # all mutants, the default test selection
    python tools/mutants.py --only tweedie   # one
    python tools/mutants.py --tests tests/   # against the whole suite (slow)

Each mutant is applied to a copy of ``featinv/`` and ``tests/`` in a temporary directory, where the
tests run; the repository itself is never modified. Exit status 1 if a mutant survives.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (file, original text, mutated text) -- each original must occur exactly once.
MUTANTS = {
    "tweedie": ("featinv/guidance.py", "x0 = (zt - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)  # Tweedie",
                "x0 = zt  # Tweedie"),
    "no-renoise": ("featinv/guidance.py",
                   "zi = math.sqrt(ratio) * z_prev + math.sqrt(1 - ratio) * randn(gens, prior.latent_shape, device=dev)",
                   "zi = z_prev"),
    "renoise-no-sqrt-ratio": ("featinv/guidance.py",
                              "zi = math.sqrt(ratio) * z_prev + math.sqrt(1 - ratio) * randn(gens, prior.latent_shape, "
                              "device=dev)",
                              "zi = z_prev + math.sqrt(1 - ratio) * randn(gens, prior.latent_shape, device=dev)"),
    "no-std-clamp": ("featinv/guidance.py", "        g = clamp_std(g, clamp_k)", "        g = g"),
    "no-rescale": ("featinv/guidance.py", "return g * per_sample(_flat(ref).norm(dim=1) / gn, g)", "return g"),
    "guidance-sign": ("featinv/guidance.py", "eps = eps + cfg.weight * mult * shape_grad(",
                      "eps = eps - cfg.weight * mult * shape_grad("),
    "no-ancestral-noise": ("featinv/guidance.py", "z_prev = z_prev + sigma * noise", "z_prev = z_prev"),
    "no-x0-clip": ("featinv/guidance.py", "x0 = x0.clamp(-x0_range, x0_range)", "x0 = x0"),
    "no-8bit-rounding": ("featinv/encoders.py", "img = img + ((img * 255).round() / 255 - img).detach()", "img = img"),
    "best-is-worst": ("featinv/guidance.py", "better = d < best_d[idx]", "better = d > best_d[idx]"),
}
DEFAULT_TESTS = ["tests/test_sampler_exact.py", "tests/test_guidance.py"]


def run_mutant(name: str, tests: list[str]) -> tuple[bool, str, float]:
    file, old, new = MUTANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        for d in ("featinv", "tests"):  # run in the copy: `python -m` puts the working directory first on sys.path
            shutil.copytree(ROOT / d, Path(tmp) / d, ignore=shutil.ignore_patterns("__pycache__"))
        path = Path(tmp) / file
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"mutant {name!r}: the original line occurs {text.count(old)} times in {file}; "
                             "update tools/mutants.py")
        path.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=tmp, env=env, capture_output=True, text=True)
        failed = [ln.split(" ")[1] for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
        return proc.returncode != 0, (failed[0] if failed else proc.stdout.strip().splitlines()[-1]), time.time() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", choices=sorted(MUTANTS), help="mutants to run (default: all)")
    ap.add_argument("--tests", nargs="*", default=DEFAULT_TESTS)
    args = ap.parse_args(argv)
    survivors = []
    print(f"{'mutant':<24}{'result':<10}{'seconds':>8}  first failing test")
    for name in args.only or MUTANTS:
        killed, detail, secs = run_mutant(name, args.tests)
        print(f"{name:<24}{'killed' if killed else 'SURVIVED':<10}{secs:>8.1f}  {detail}", flush=True)
        if not killed:
            survivors.append(name)
    print(f"\n{len(MUTANTS if not args.only else args.only) - len(survivors)} killed, {len(survivors)} survived"
          + (f": {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
