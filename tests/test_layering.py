"""The layering of issue 12, checked: import-linter contracts and a plain-PyTorch core."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    """No import cycle in featinv; the core never imports Lightning, W&B, the harness layer or a world."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "broken" in proc.stdout and "0 broken" in proc.stdout


def test_core_api_runs_without_lightning_or_wandb():
    code = ("import sys, torch, featinv; from featinv.api import invert; "
            "r = invert(torch.rand(1, 1, 16, 16), method='unguided', steps=2); "
            "bad = sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('lightning', 'wandb', "
            "'pytorch_lightning')}); "
            "harness = sorted(m for m in sys.modules if m in ('featinv.module', 'featinv.callbacks', 'featinv.cli', "
            "'featinv.data')); print(bad, harness, bool(torch.isfinite(r.images).all()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[] [] True"
