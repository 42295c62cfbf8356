"""What every trained zoo model records beside its weights: safetensors file, environment, command, meta.json.

Shared by the digits trainer (``featinv.zoo.train``) and the shapes world (``featinv.zoo.shapes.train``)
so that neither imports the other.
"""
from __future__ import annotations

import json
import platform
import shlex
import sys
from pathlib import Path

import torch


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """``model.state_dict()`` as safetensors (contiguous, detached), creating the folder."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def command_line() -> str:
    return "python -m featinv.zoo.train " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def env_info() -> dict:
    import diffusers
    import timm

    return dict(torch=torch.__version__, diffusers=diffusers.__version__, timm=timm.__version__,
                python=platform.python_version(), machine=f"{platform.machine()} CPU, torch threads="
                f"{torch.get_num_threads()}", command=command_line())


def update_meta(out: Path, name: str, entry: dict) -> None:
    """Set ``meta.json[name] = entry`` in ``out`` (keys sorted, other entries kept)."""
    path = out / "meta.json"
    meta = json.loads(path.read_text()) if path.exists() else {}
    meta[name] = entry
    path.write_text(json.dumps(dict(sorted(meta.items())), indent=2) + "\n")
