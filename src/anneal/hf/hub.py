"""A Hugging Face hub id (``Qwen/Qwen3-0.6B``) where a model or tokenizer directory is expected.

``resolve_model_dir(value, field)`` returns ``value`` when it is a directory. Otherwise, when it reads as
``org/name``, it is the snapshot directory of that repository in ``huggingface_hub``'s cache
(``$HF_HOME/hub/models--org--name/snapshots/<commit>/``), downloaded first unless ``HF_HUB_OFFLINE`` is set,
in which case only the cache is read. Only the files the caller names are fetched (``allow_patterns``).
``huggingface_hub`` (a dependency of ``transformers``) is imported only here, only for a hub id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from anneal.errors import ConfigError

# The hub's names: letters, digits, "-", "_", "." (not leading), one "/" between owner and repository.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_TRUE = ("1", "ON", "YES", "TRUE")


def looks_like_hub_id(value: object) -> bool:
    """``org/name`` and not an existing path: what ``resolve_model_dir`` looks up in the hub's cache."""
    text = str(value)
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and not os.path.exists(text)


def resolve_model_dir(value: str | Path, field: str, *, files: tuple[str, ...] = ()) -> Path:
    """``value`` when it is a directory, else the cached snapshot of the hub id ``value`` (see the module).

    ``files`` are glob patterns of the repository's files the caller reads (all of them when empty).
    A value that is neither is returned unchanged, for the caller's own "not a directory" error.
    """
    if Path(value).is_dir() or not looks_like_hub_id(value):
        return Path(value)
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise ConfigError(f"{field} ({value!r}) is not a directory; to read it as a Hugging Face hub id, "
                          "install huggingface_hub (pip install huggingface_hub)") from None
    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE
    try:
        path = huggingface_hub.snapshot_download(str(value), local_files_only=offline,
                                                 allow_patterns=list(files) or None)
    except (OSError, ValueError) as error:  # not cached offline, no such repository, no network, a bad id
        raise ConfigError(_not_found(value, field, offline, constants.HF_HUB_CACHE, error)) from None
    return Path(path)


def _not_found(value: str | Path, field: str, offline: bool, cache: str, error: Exception) -> str:
    where = f"the Hugging Face cache {cache}"
    if offline:
        return (f"{field} ({value!r}) is neither a directory nor a hub id in {where} "
                "(HF_HUB_OFFLINE is set: nothing is downloaded)")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{field} ({value!r}) is neither a directory nor a hub id found on the hub or in {where}: {reason}"
