"""Loading never unpickles arbitrary objects: crafted .metadata payloads of every pickle protocol."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from anneal.checkpoint import files
from anneal.checkpoint.safe_reader import read_metadata_file
from anneal.errors import ConfigError


class Global:
    """A global name written as-is into the pickle (pickle itself would refuse a dotted lie)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable
        raise AssertionError("never called here")


class Call:
    """Pickles as ``func(*args)`` (REDUCE): func a Global or another Call."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __call__(self, *args):
        raise AssertionError("never called here")

    def __reduce__(self):
        return self.func, self.args


class _Crafter(pickle._Pickler):  # the pure-Python pickler: its dispatch table takes our Global
    dispatch = dict(pickle._Pickler.dispatch)

    def save_raw_global(self, obj: Global) -> None:
        if self.proto >= 4:  # STACK_GLOBAL: module and name from the stack; the name may be dotted
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[Global] = save_raw_global


def craft(obj, protocol: int) -> bytes:
    out = io.BytesIO()
    _Crafter(out, protocol=protocol).dump(obj)
    return out.getvalue()


_DCP = "torch.distributed.checkpoint."


def _payloads(marker: Path) -> dict[str, object]:
    touch = f"touch {marker}"
    py_touch = f"open({str(marker)!r}, 'w').close()"
    import_os = Call(Global("importlib", "import_module"), "os")
    return {
        "os.system": Call(Global("os", "system"), touch),
        "posix.system": Call(Global("posix", "system"), touch),
        "eval": Call(Global("builtins", "eval"), py_touch),
        "exec": Call(Global("builtins", "exec"), py_touch),
        "subprocess.call": Call(Global("subprocess", "call"), ["touch", str(marker)]),
        "subprocess.Popen": Call(Global("subprocess", "Popen"), ["touch", str(marker)]),
        # dotted names under modules (and classes) a checkpoint's metadata does use
        "dcp.filesystem.os.system": Call(Global(_DCP + "filesystem", "os.system"), touch),
        "dcp.metadata.torch.os.system": Call(Global(_DCP + "metadata", "torch.os.system"), touch),
        "pathlib.os.system": Call(Global("pathlib", "os.system"), touch),
        "torch.os.system": Call(Global("torch", "os.system"), touch),
        "class globals": Call(Global(_DCP + "filesystem", "_StorageInfo.__init__.__globals__.get"), "os"),
        "getattr chain": Call(Call(Global("builtins", "getattr"), import_os, "system"), touch),
        "torch.load": Call(Global("torch", "load"), str(marker)),
    }


PROTOCOLS = range(0, pickle.HIGHEST_PROTOCOL + 1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_crafted_metadata_runs_its_payload(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "PWNED"
    for name, payload in _payloads(marker).items():
        evil = tmp_path / f"{name}.metadata"
        evil.write_bytes(craft(payload, protocol))
        with pytest.raises(ConfigError, match="not a valid checkpoint metadata file .*is not part of"):
            read_metadata_file(evil)
        assert not marker.exists(), f"{name} (protocol {protocol}) ran its payload"


def _real_metadata(directory: Path):
    state = {"w": torch.randn(3, 4), "step": torch.tensor(2.0), "b": torch.zeros(5, dtype=torch.bfloat16)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)))
    with (directory / ".metadata").open("rb") as f:
        return pickle.load(f)  # our own file, written just now


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_real_metadata_loads_in_every_protocol_dcp_could_write(tmp_path: Path, protocol: int) -> None:
    metadata = _real_metadata(tmp_path / "ck")
    path = tmp_path / "ck" / ".metadata"
    path.write_bytes(pickle.dumps(metadata, protocol=protocol))
    loaded = read_metadata_file(path)
    assert sorted(loaded.state_dict_metadata) == ["b", "step", "w"]
    assert loaded.state_dict_metadata["b"].properties.dtype == torch.bfloat16


def test_a_non_tensor_entry_is_refused_because_dcp_would_unpickle_it(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = _real_metadata(tmp_path / "ck")
    metadata.state_dict_metadata["w"] = BytesStorageMetadata()
    path = tmp_path / "ck" / ".metadata"
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(ConfigError, match="BytesStorageMetadata"):  # refused by name, not by its class
        read_metadata_file(path)


def test_a_data_file_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    metadata = _real_metadata(tmp_path / "ck")
    for info in metadata.storage_data.values():
        info.relative_path = "../../etc/passwd"
    path = tmp_path / "ck" / ".metadata"
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(ConfigError, match="outside the checkpoint directory"):
        read_metadata_file(path)


@pytest.mark.slow
def test_crafted_checkpoint_with_a_regenerated_manifest_is_refused_end_to_end(ck: Path, tmp_path: Path) -> None:  # noqa: E501
    """Only the unpickler stands in the way: the manifest is rewritten to match the crafted file."""
    from ckpt_helpers import digest, run

    marker = tmp_path / "PWNED"
    latest = ck / "iter_0000010"
    metadata = latest / ".metadata"
    metadata.write_bytes(craft(_payloads(marker)["dcp.filesystem.os.system"], 4))
    files.write_manifest(latest)
    files.verify(latest)  # the checksums agree: the manifest is no defence here
    before = digest(ck)
    result = run(tmp_path, "train.train_iters=20", f"checkpoint.save={ck}")
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"anneal: error: {metadata}: not a valid checkpoint metadata file")
    assert "os.system is not part of a checkpoint's metadata" in line
    assert f"checkpoint.load={ck / 'iter_0000005'}" in line  # the earlier checkpoint still verifies
    assert not marker.exists()
    assert digest(ck) == before


def _manifested(directory: Path, state: str) -> Path:
    """A directory that is an anneal checkpoint as far as ``files.verify`` reads: a manifest and state.json."""
    directory.mkdir()
    (directory / files.STATE).write_text(state)
    files.write_manifest(directory)
    return directory


def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    import json

    secret = tmp_path / "secret"
    secret.write_text("not the checkpoint's")
    directory = _manifested(tmp_path / "iter_0000001", "{}")
    manifest = json.loads((directory / files.MANIFEST).read_text())
    manifest["files"]["../secret"] = {"bytes": secret.stat().st_size, "crc32": files._crc32(secret)}
    (directory / files.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"names '\.\./secret', a file outside the checkpoint"):
        files.verify(directory)


@pytest.mark.parametrize("state", ["[1, 2]", '"iteration"'])
def test_a_state_json_that_is_not_an_object_is_refused(tmp_path: Path, state: str) -> None:
    with pytest.raises(ConfigError, match=r"state\.json: not a JSON object"):
        files.verify(_manifested(tmp_path / "iter_0000001", state))
