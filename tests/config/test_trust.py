"""A config from elsewhere is data: every ``_target_`` is checked against its field before Hydra builds it.

The vectors of issue 24 run through the real entry point (a shared YAML with ``--config-path``, and
the same as command-line overrides): each exits 2 with one line before the file it names is touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from anneal.config.compose import load, to_yaml
from anneal.errors import ConfigError
from anneal_testing import ROOT

PRECIOUS = "precious: written by the user\n"


def _yaml_with(tmp_path: Path, name: str, **sections) -> Path:
    """The default config's resolved YAML (what a run saves and people share) with ``sections`` replaced."""
    tree = OmegaConf.to_container(OmegaConf.create(to_yaml(load([]))))
    tree.update(sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(tree)))
    return path


def _handler(victim: Path) -> dict:
    return {"_target_": "logging.FileHandler", "filename": str(victim), "mode": "w"}


def test_every_vector_exits_2_through_the_launcher_before_the_file_is_touched(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    handler = _handler(victim)
    zipfile = {"_target_": "zipfile.ZipFile", "file": str(victim), "mode": "w"}
    as_override = f"{{_target_: logging.FileHandler, filename: '{victim}', mode: w}}"
    runs = {  # vector -> (argv, the line's start)
        "logger from a YAML": (["--config-path", str(tmp_path), "--config-name",
                                _yaml_with(tmp_path, "logger", logger=handler).stem], "logger._target_"),
        "logger from overrides": (["logger._target_=logging.FileHandler", f"+logger.filename={victim}",
                                   "+logger.mode=w"], "logger._target_"),
        "callback from a YAML": (["--config-path", str(tmp_path), "--config-name",
                                  _yaml_with(tmp_path, "callback", hydra={"callbacks": {"x": handler}}).stem],
                                 "hydra.callbacks.x._target_"),
        "callback from an override": ([f"+hydra.callbacks.x={as_override}"], "hydra.callbacks.x._target_"),
        "zipfile in checkpoint.save": (["--config-path", str(tmp_path), "--config-name",
                                        _yaml_with(tmp_path, "zip", checkpoint={**load([]).__dict__["checkpoint"]
                                                   .__dict__, "_target_": "anneal.config.runtime.CheckpointConfig",
                                                   "save": zipfile}).stem], "checkpoint.save._target_"),
        "job log file outside the run": (["hydra.job_logging.handlers.file.filename=" + str(victim),
                                          "+hydra.job_logging.handlers.file.mode=w"],
                                         "hydra.job_logging.handlers.file"),
    }
    env = {k: v for k, v in os.environ.items() if k not in ("ANNEAL_FULL_ERROR", "HYDRA_FULL_ERROR")}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "scripts" / "pretrain.py"), *argv,
                                     "train.train_iters=2"], cwd=tmp_path, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, _) in runs.items()}  # side by side: each is a whole launcher start
    outputs = {name: proc.communicate(timeout=120) for name, proc in procs.items()}
    results = {name: (procs[name].returncode, *output) for name, output in outputs.items()}
    assert victim.read_text() == PRECIOUS, "a config truncated the user's file"
    for name, (code, out, err) in results.items():
        lines = err.strip().splitlines()
        assert code == 2, f"{name}: exit {code}\n{out}\n{err}"
        assert len(lines) == 1 and lines[0].startswith(f"anneal: error: {runs[name][1]}"), f"{name}: {err}"
    assert not (tmp_path / "outputs").exists(), "refused before Hydra made a run directory"


@pytest.mark.parametrize("overrides, message", [
    (["logger._target_=anneal.config.runtime.CheckpointConfig"],
     r"^logger\._target_ \('anneal\.config\.runtime\.CheckpointConfig'\) must be "
     r"anneal\.config\.runtime\.LoggerConfig"),
    (["scheduler._target_=anneal.config.model.ModelConfig"],
     r"^scheduler\._target_ .* must be anneal\.config\.scheduler\.SchedulerConfig or "
     r"anneal\.config\.torch_scheduler\.TorchSchedulerConfig"),
    (["_target_=collections.OrderedDict"], r"^the root\._target_ \('collections\.OrderedDict'\) must be"),
    (["+logger._args_=[{_target_: logging.FileHandler, filename: x}]"],
     r"^logger\._args_\[0\]\._target_ \('logging\.FileHandler'\) is not allowed here"),
    (["+train.rampup_batch_size={_target_: builtins.list}"],
     r"^train\.rampup_batch_size\._target_ .* train\.rampup_batch_size takes plain data \(list\[int\] or null\)"),
    (["+optimizer.param_group_rules=[{_target_: logging.FileHandler, filename: x}]"],
     r"^optimizer\.param_group_rules\[0\]\._target_ \('logging\.FileHandler'\) must be "
     r"anneal\.config\.optimizer\.ParamGroupRule"),
    (["logger.wandb_project='${oc.create:\"{_target_: logging.FileHandler, filename: x}\"}'"],
     r"^logger\.wandb_project\._target_ \('logging\.FileHandler'\) is not allowed here"),
])
def test_a_target_other_than_the_fields_class_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(overrides)


def test_a_target_outside_anneal_is_refused_without_importing_its_module(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "side_effect_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass X: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^logger\._target_ \('side_effect_module\.X'\)"):
        load(["logger._target_=side_effect_module.X"])
    assert not marker.exists(), "the module a refused target names was imported"


@pytest.mark.parametrize("overrides", [
    [],
    ["hydra/job_logging=default"], ["hydra/job_logging=stdout"], ["hydra/job_logging=none"],
    ["hydra/job_logging=disabled"], ["hydra/hydra_logging=none"], ["hydra/hydra_logging=disabled"],
    ["+hydra.callbacks.log={_target_: hydra.experimental.callbacks.LogJobReturnCallback}"],
    ["hydra.job.name=pretrain", "hydra.run.dir=runs/a"],
])
def test_hydras_own_options_and_callbacks_are_accepted(overrides: list[str]) -> None:
    load(overrides)


@pytest.mark.parametrize("overrides, message", [
    (["hydra/hydra_logging=hydra_debug"], r"^hydra\.hydra_logging\.handlers\.file\.mode \('w'\) must be 'a'"),
    (["hydra.job_logging.handlers.file.filename=pretrain.log"],
     r"^hydra\.job_logging\.handlers\.file\.filename \('pretrain\.log'\) must be a plain name inside the run"),
    (["hydra.job_logging.handlers.file.filename=${hydra.runtime.output_dir}/../x.log"],
     r"^hydra\.job_logging\.handlers\.file\.filename"),
    (["hydra.job_logging.handlers.console.class=logging.handlers.SocketHandler"],
     r"^hydra\.job_logging\.handlers\.console \('logging\.handlers\.SocketHandler'\) must have class one of"),
    (["hydra.job_logging.handlers.console.stream=ext://os.environ"],
     r"^hydra\.job_logging\.handlers\.console\.stream \('ext://os\.environ'\) must be one of"),
    (["+hydra.job_logging.handlers.console.host=example.org"],
     r"^hydra\.job_logging\.handlers\.console\.host is not allowed for logging\.StreamHandler"),
    (["+hydra.job_logging.formatters.x={class: logging.FileHandler}"],
     r"^hydra\.job_logging\.formatters\.x\.class \('logging\.FileHandler'\) must be a subclass of "
     r"logging\.Formatter"),
    (["hydra.job.name=../../x"], r"^hydra\.job\.name \('\.\./\.\./x'\) must be a plain file name"),
    (["hydra.launcher._target_=logging.FileHandler"],
     r"^hydra\.launcher\._target_ \('logging\.FileHandler'\) must be a subclass of hydra\.plugins\.launcher"),
    (["+hydra.sweeper.x={_target_: logging.FileHandler, filename: x}"],
     r"^hydra\.sweeper\.x\._target_ \('logging\.FileHandler'\) is not allowed here"),
    (["+hydra.callbacks.log={_target_: hydra.experimental.callbacks.LogJobReturnCallback, "
      "x: {_target_: logging.FileHandler, filename: x}}"], r"^hydra\.callbacks\.log\.x\._target_"),
])
def test_hydra_nodes_that_could_write_or_run_elsewhere_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(overrides)


@pytest.mark.parametrize("section, entry, message", [
    ("formatters", {"()": "logging.FileHandler", "filename": "x"}, r"\.formatters\.f\.\(\) .* logging\.Formatter"),
    ("filters", {"()": "subprocess.Popen", "args": "x"}, r"\.filters\.f\.\(\) .* logging\.Filter"),
    ("handlers", {"()": "logging.FileHandler", "filename": "x"}, r"\.handlers\.f \('logging\.FileHandler'\)"),
])
def test_logging_factories_are_checked_as_their_section_says(section: str, entry: dict, message: str) -> None:
    from anneal.config.trust import check_logging

    with pytest.raises(ConfigError, match=r"^hydra\.job_logging" + message):
        check_logging(OmegaConf.create({"version": 1, section: {"f": entry}}), "hydra.job_logging")
