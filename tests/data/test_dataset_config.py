"""DatasetConfig validation (messages name the dotted field) and the shipped conf/dataset/ group files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from anneal.config.dataset import DatasetConfig, check_anneal_blend
from anneal.data.spec import blend_of, parse_blend, split_weights
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
    ({"kind": "indexed", "data_path": ["a", "0.3"]}, "dataset.data_path[1] ('0.3') breaks the blend"),
    ({"kind": "indexed", "data_path": [0.3, "a", "b", 0.7]}, "dataset.data_path[2] ('b') breaks the blend"),
    ({"kind": "indexed", "data_path": [0.3, "a", 0.7]}, "dataset.data_path[2] (0.7) breaks the blend"),
    ({"kind": "indexed", "data_path": [0.3, "a", 0, "b"]},
     "dataset.data_path[2] (0) must be a blend weight > 0"),
    ({"kind": "indexed", "data_path": [1, "a", "-2", "b"]},
     "dataset.data_path[2] ('-2') must be a blend weight > 0"),
    ({"kind": "indexed", "data_path": [1, "a", 2, "b.idx"]},
     "dataset.data_path[3] ('b.idx') must be a prefix"),
    ({"kind": "indexed", "data_path": ["a"], "train_data_path": ["b"]},
     "dataset.train_data_path cannot be combined with dataset.data_path"),
    ({"kind": "indexed", "valid_data_path": ["b"]},
     "dataset.data_path ([]) must name at least one prefix when dataset.kind is 'indexed'; "
     "dataset.valid_data_path needs dataset.train_data_path"),
    ({"kind": "indexed", "anneal_data_path": [1, "b"]}, "dataset.data_path ([]) must name at least one"),
    ({"anneal_data_path": ["a"]}, "dataset.anneal_data_path (['a']) is only read when dataset.kind is"),
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


def test_blends_parse_like_megatron() -> None:
    cfg = DatasetConfig(kind="indexed", data_path=[3, "/d/web", "1", "/d/code"], anneal_data_path=["/d/hq"])
    cfg.validate()
    web_code = blend_of(cfg, "data_path")
    assert web_code.prefixes == ("/d/web", "/d/code") and web_code.weights == (0.75, 0.25)
    assert web_code.prefix_field(1) == "dataset.data_path[3]"
    assert blend_of(cfg, "anneal_data_path").weights is None and blend_of(cfg, "test_data_path") is None
    assert cfg.uses_split
    per_split = DatasetConfig(kind="indexed", train_data_path=[0.5, "a", 0.5, "b"], valid_data_path=["c"])
    per_split.validate()
    assert not per_split.uses_split and blend_of(per_split, "train_data_path").weights == (0.5, 0.5)
    assert parse_blend("dataset.data_path", ["only"]).prefix_field(0) == "dataset.data_path[0]"


def test_anneal_blend_needs_a_wsd_schedule() -> None:
    cfg = DatasetConfig(kind="indexed", data_path=["a"], anneal_data_path=[1, "b", 1, "c"])
    check_anneal_blend(cfg, "WSD")
    check_anneal_blend(DatasetConfig(kind="indexed", data_path=["a"]), "cosine")
    with pytest.raises(ConfigError, match=r"^dataset.anneal_data_path \(\[1, 'b', 1, 'c'\]\) needs "
                                          r"scheduler.lr_decay_style 'WSD' \(got 'cosine'\)"):
        check_anneal_blend(cfg, "cosine")


def test_defaults_validate_and_split_parses_megatron_weights() -> None:
    DatasetConfig().validate()
    DatasetConfig(kind="indexed", data_path=["/data/corpus_text_document"]).validate()
    assert split_weights("969,30,1") == (969.0, 30.0, 1.0)
    assert split_weights("0.9, 0.1, 0") == (0.9, 0.1, 0.0)


def test_config_module_imports_neither_numpy_nor_torch() -> None:
    code = ("import sys, anneal.config.dataset, anneal.data, anneal.data.spec, anneal.data.tokenizer; "
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


def test_evaluation_needs_validation_data() -> None:
    per_split = DatasetConfig(kind="indexed", train_data_path=["a"])
    with pytest.raises(ConfigError, match=r"^train.eval_interval \(50\) needs validation data, but "
                                          r"dataset.valid_data_path is empty"):
        per_split.check_against(1000, "cosine", eval_interval=50)
    per_split.check_against(1000, "cosine", eval_interval=None)
    with pytest.raises(ConfigError, match=r"^train.eval_interval \(5\) .* dataset.split \('1,0,0'\) gives"):
        DatasetConfig(split="1,0,0").check_against(1000, "cosine", eval_interval=5)
    DatasetConfig(kind="indexed", train_data_path=["a"], valid_data_path=["b"]).check_against(
        1000, "cosine", eval_interval=5)


def test_a_single_prefix_without_brackets_is_a_list_of_one(compose) -> None:
    cfg = compose("dataset=indexed", "dataset.data_path=/data/web", "dataset.anneal_data_path=/data/hq",
                  "scheduler=wsd")
    cfg.validate()
    assert cfg.dataset.data_path == ["/data/web"] and cfg.dataset.anneal_data_path == ["/data/hq"]


def test_a_path_field_of_another_type_names_what_it_must_be(compose) -> None:
    with pytest.raises(ConfigError, match=r"^dataset.data_path \(True\) must be a list of strings or numbers$"):
        compose("dataset=indexed", "dataset.data_path=true").validate()
