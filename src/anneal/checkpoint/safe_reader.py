"""A DCP reader that never unpickles arbitrary objects.

``torch.distributed.checkpoint`` stores its metadata with ``pickle`` and reads it back with a
plain ``pickle.load``; a checkpoint from elsewhere could run code on load. This reader resolves
only an explicit list of exact classes that DCP's own metadata is made of: no other name, no
dotted name (pickle protocol 4 would walk ``module.attr.attr`` to anything the module imported).
The metadata must then describe tensors only: DCP reads a non-tensor entry with
``torch.load(weights_only=False)``, and anneal keeps every non-tensor value in JSON. Tensor data
itself is read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from anneal.errors import ConfigError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# Every global that DCP's .metadata pickle names (torch 2.x), exactly; see test_safe_reader.py.
_ALLOWED = frozenset({
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "MetadataIndex"), (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "TensorStorageMetadata"), (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "ChunkStorageMetadata"), (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
})


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        if (module, name) in _ALLOWED:  # exact names only: none of them holds a dot
            return super().find_class(module, name)
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of a checkpoint's metadata")


def read_metadata_file(path: Path) -> Metadata:
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, KeyError,
            IndexError, ImportError, RecursionError, MemoryError) as error:
        raise ConfigError(f"{path}: not a valid checkpoint metadata file ({error})") from error
    if not isinstance(metadata, Metadata):
        raise ConfigError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
    _check_entries(metadata, path)
    return metadata


def _check_entries(metadata: Metadata, path: Path) -> None:
    """Tensors only, stored in plain files of this directory."""
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise ConfigError(f"{path}: not a valid checkpoint metadata file (no entries)")
    for key, entry in entries.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise ConfigError(f"{path}: entry {key!r} is a {type(entry).__name__}, not a tensor; anneal "
                              "checkpoints store only tensors through DCP (refused: it would be unpickled)")
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise ConfigError(f"{path}: not a valid checkpoint metadata file (no storage index)")
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ConfigError(f"{path}: names a data file {name!r} outside the checkpoint directory")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata_file(Path(self.path) / ".metadata")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata
