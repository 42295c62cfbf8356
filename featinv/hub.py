"""Offline-friendly loading: one clear error instead of retries when weights are absent."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["WeightsNotFoundError", "hub_call", "offline", "missing_weights", "not_found", "first_line"]


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


def first_line(e: Exception) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    return str(e).strip().splitlines()[0][:300].rstrip(".") if str(e).strip() else type(e).__name__


def not_found(what: str, where: str, how: str, reason: str = "", download: bool = False) -> WeightsNotFoundError:
    """Weights that are not a Hugging Face hub id (torch hub, local files) are missing."""
    off = " (HF_HUB_OFFLINE=1, so no download was tried)" if download and offline() else ""
    return WeightsNotFoundError(f"weights for {what!r} are not available: looked in {where}{off}{reason}.\n"
                                f"To provide them: {how}")


def missing_weights(model_id: str, detail: str = "", where: str | None = None) -> WeightsNotFoundError:
    """Weights of a Hugging Face hub id are missing: where featinv looked and how to provide them."""
    where = where or (f"the local path {model_id!r}" if Path(str(model_id)).exists()
                      else f"the Hugging Face cache ({_cache_dir()})")
    return not_found(model_id, where, download=True, reason=f". {detail}".rstrip(". ") if detail else "",
                     how=f"on a connected machine run `huggingface-cli download {model_id}` (or the library's own "
                         "download) and copy the cache here, pointing HF_HOME / HF_HUB_CACHE (TORCH_HOME for "
                         "torchvision) at it; or pass a local directory/file instead of the id.")


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
            raise missing_weights(str(model_id), detail=first_line(e)) from e
        raise
