"""A DCP reader that never unpickles arbitrary objects.

``torch.distributed.checkpoint`` stores its metadata with ``pickle`` and reads it back with a
plain ``pickle.load``; a checkpoint from elsewhere could run code on load. This reader allows only
the classes DCP's own metadata is made of. Tensor data is read as raw storage, and anneal keeps
every non-tensor value in JSON, so no other unpickling happens.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from anneal.errors import ConfigError

_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}
_ALLOWED = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
            ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata_file(path: Path) -> Metadata:
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as error:
        raise ConfigError(f"{path}: not a valid checkpoint metadata file ({error})") from error
    if not isinstance(metadata, Metadata):
        raise ConfigError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata_file(Path(self.path) / ".metadata")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata
