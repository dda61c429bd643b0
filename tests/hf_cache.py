"""A local Hugging Face hub cache, laid out as ``huggingface_hub`` writes it, for hub ids offline.

``$HF_HOME/hub/models--org--name/`` holds ``blobs/<sha256>`` (the files), ``snapshots/<commit>/<name>``
(symlinks ``../../blobs/<sha256>``) and ``refs/main`` (the commit). Nothing is downloaded:
``HF_HUB_OFFLINE=1`` is set for this process and for any subprocess that inherits the environment.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def offline_hub(monkeypatch, home: Path) -> Path:
    """Point ``huggingface_hub`` at an empty cache under ``home``, offline; return it (``home/hub``)."""
    import huggingface_hub.constants as constants

    hub = home / "hub"
    hub.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # read at import: set for this process too
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def add_repo(hub: Path, repo_id: str, source: Path) -> Path:
    """Cache every file of the directory ``source`` as the main revision of ``repo_id``; its snapshot."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in source.iterdir() if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / digest)
        os.symlink(f"../../blobs/{digest}", snapshot / file.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot
