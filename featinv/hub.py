"""Offline-friendly loading: one clear error instead of retries when weights are absent."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["WeightsNotFoundError", "hub_call", "offline"]


class WeightsNotFoundError(FileNotFoundError):
    """Model weights are not on this machine and cannot be downloaded."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return os.path.expanduser("~/.cache/huggingface/hub")


def missing_weights(model_id: str, detail: str = "", where: str | None = None) -> WeightsNotFoundError:
    where = where or (f"the local path {model_id!r}" if Path(str(model_id)).exists()
                      else f"the Hugging Face cache ({_cache_dir()})")
    return WeightsNotFoundError(
        f"weights for {model_id!r} are not available: looked in {where}"
        f"{' (HF_HUB_OFFLINE=1, so no download was tried)' if offline() else ''}. {detail}\n"
        "To provide them: on a connected machine run `huggingface-cli download "
        f"{model_id}` (or the library's own download) and copy the cache here, pointing HF_HOME / "
        "HF_HUB_CACHE (TORCH_HOME for torchvision) at it; or pass a local directory/file instead of "
        "the id.")


def hub_call(fn, model_id, *args, local_files_only: bool | None = None, **kwargs):
    """Call a ``from_pretrained``-style loader; turn 'not found offline' into WeightsNotFoundError."""
    if local_files_only is None:
        local_files_only = offline() or Path(str(model_id)).exists()
    try:
        return fn(model_id, *args, local_files_only=local_files_only, **kwargs)
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError is an OSError subclass
        msg = str(e)
        if isinstance(e, FileNotFoundError) or any(s in msg for s in (
                "local_files_only", "offline", "LocalEntryNotFound", "does not appear to have",
                "Can't load", "not found", "couldn't connect", "Cannot find")):
            raise missing_weights(str(model_id), detail=msg.splitlines()[0][:300]) from e
        raise
