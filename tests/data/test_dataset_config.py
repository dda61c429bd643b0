"""DatasetConfig validation (messages name the dotted field) and the shipped conf/dataset/ group files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from anneal.config.dataset import DatasetConfig, split_weights
from anneal.errors import ConfigError

CONF_DIR = Path(__file__).parents[2] / "conf" / "dataset"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"kind": "stdlb"},
     "dataset.kind ('stdlb') must be one of 'stdlib', 'mock', 'indexed'; did you mean 'stdlib'?"),
    ({"split": "1,2"},
     "dataset.split ('1,2') must be three comma-separated non-negative weights with a positive sum"),
    ({"split": "1,-1,0"}, "dataset.split ('1,-1,0') must be three comma-separated non-negative weights"),
    ({"split": "0,0,0"}, "dataset.split ('0,0,0') must be three comma-separated non-negative weights"),
    ({"split": "a,b,c"}, "dataset.split ('a,b,c') must be three comma-separated non-negative weights"),
    ({"split": "0,1,0"}, "dataset.split ('0,1,0') must give the train split"),
    ({"kind": "indexed"},
     "dataset.data_path ([]) must name at least one prefix when dataset.kind is 'indexed'"),
    ({"kind": "indexed", "data_path": ["a", "x.bin"]},
     "dataset.data_path[1] ('x.bin') must be a prefix without"),
    ({"kind": "indexed", "data_path": ["0.3", "a"]},
     "dataset.data_path[0] ('0.3') looks like a blend weight"),
    ({"kind": "indexed", "data_path": [""]}, "dataset.data_path[0] ('') must be a non-empty path prefix"),
    ({"data_path": ["a"]}, "dataset.data_path (['a']) is only read when dataset.kind is 'indexed'"),
    ({"seed": -1}, "dataset.seed (-1) must be a non-negative integer"),
    ({"stdlib_max_bytes": 0}, "dataset.stdlib_max_bytes (0) must be a positive integer"),
    ({"mock_num_tokens": -5}, "dataset.mock_num_tokens (-5) must be a positive integer"),
])
def test_validation_messages_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        DatasetConfig(**overrides).validate()
    assert str(caught.value).startswith(message)


def test_defaults_validate_and_split_parses_megatron_weights() -> None:
    DatasetConfig().validate()
    DatasetConfig(kind="indexed", data_path=["/data/corpus_text_document"]).validate()
    assert split_weights("969,30,1") == (969.0, 30.0, 1.0)
    assert split_weights("0.9, 0.1, 0") == (0.9, 0.1, 0.0)


def test_config_module_imports_neither_numpy_nor_torch() -> None:
    code = ("import sys, anneal.config.dataset, anneal.data, anneal.data.tokenizer; "
            "heavy = {'numpy', 'torch', 'tokenizers'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["stdlib", "mock", "indexed"])
def test_shipped_group_files_instantiate(name: str) -> None:
    cfg = instantiate(OmegaConf.load(CONF_DIR / f"{name}.yaml"), _convert_="all")
    assert isinstance(cfg, DatasetConfig) and cfg.kind == name
    if name == "indexed":  # the user must name the data
        with pytest.raises(ConfigError, match=r"^dataset.data_path \(\[\]\) must name at least one prefix"):
            cfg.validate()
        cfg.data_path = ["/data/corpus_text_document"]
    cfg.validate()


def test_every_group_file_is_tested() -> None:
    assert sorted(path.stem for path in CONF_DIR.glob("*.yaml")) == ["indexed", "mock", "stdlib"]
