"""PyTorch's engine through the real entry point under torchrun (gloo, CPU): FSDP2, HSDP, TP, TP × FSDP2.

Every layout trains the same 10 iterations as one native process, with Megatron's document flags on: losses within 1e-5 relative, the
lr and wd of every iteration equal to the planned schedule bit for bit. Checkpoints move across
layouts (FSDP2 2 -> 1 process -> FSDP2 2, TP 2 -> data parallel 2) and a SIGKILL-resume within a
layout is bit-identical. The runs are few and small (two layers, 64 tokens): CI runs them all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from anneal_testing import ROOT, free_port, metrics_by_iteration

pytestmark = pytest.mark.slow

RUN = ["model.num_layers=2", "model.seq_length=64", "train.train_iters=10", "train.global_batch_size=8",
       "train.micro_batch_size=2", "scheduler.lr_warmup_iters=2", "logger.log_interval=1",
       "train.eval_interval=null", "logger.plot_schedule=false", "dataset=mock", "checkpoint.save_interval=5",
       # documents end inside windows: every layout splits attention and positions at them, and sums the
       # counted tokens of its global batch over its data-parallel ranks (the per-token loss)
       "dataset.reset_position_ids=true", "dataset.reset_attention_mask=true", "dataset.eod_mask_loss=true"]
FSDP2 = ["dist.use_torch_fsdp2=true"]
ITERATIONS = list(range(1, 11))


def _pretrain(run_dir: Path, *args: str, nproc: int = 1, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ANNEAL_FAULT", "ANNEAL_FULL_ERROR")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **({"ANNEAL_FAULT": fault} if fault else {}),
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2"})  # a killed rank's peer is stuck in a collective
    script = [str(ROOT / "scripts" / "pretrain.py"), *RUN, *args, f"hydra.run.dir={run_dir}"]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                                      "--master-port", str(free_port())]
    return subprocess.run([sys.executable, *launcher, *script], cwd=run_dir.parent, env=env, capture_output=True,
                          text=True, timeout=300)


def _trained(run_dir: Path, *args: str, nproc: int = 1) -> dict[int, dict]:
    result = _pretrain(run_dir, *args, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return metrics_by_iteration(run_dir)


def _planned() -> tuple[list[float], list[float]]:
    from anneal.config.compose import load
    from anneal.plot import planned

    derived = load(RUN).validate()
    return planned(derived.schedule, derived.ramp, ITERATIONS)


def _assert_matches(records: dict[int, dict], reference: dict[int, dict], iterations: list[int],
                    rel: float = 1e-5) -> None:
    for it in iterations:
        assert records[it]["loss"] == pytest.approx(reference[it]["loss"], rel=rel), it
        assert records[it]["lr"] == reference[it]["lr"] and records[it]["weight_decay"] == reference[it]["weight_decay"]


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """The native engine on one process, saving at 5 and 10: the reference every layout must match."""
    tmp = tmp_path_factory.mktemp("native")
    records = _trained(tmp / "run", f"checkpoint.save={tmp / 'ckpt'}")
    lrs, wds = _planned()
    assert [records[i]["lr"] for i in ITERATIONS] == lrs and [records[i]["weight_decay"] for i in ITERATIONS] == wds
    return tmp / "ckpt", records


@pytest.fixture(scope="module")
def one_process(native) -> dict[int, dict]:
    return native[1]


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """FSDP2 over 2 ranks, saving at 5 and 10: (its save directory, its metrics)."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    return tmp / "ckpt", _trained(tmp / "run", *FSDP2, f"checkpoint.save={tmp / 'ckpt'}", nproc=2)


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """TP 2 set alone: it turns PyTorch's engine on by itself (no dist.use_torch_fsdp2 given)."""
    tmp = tmp_path_factory.mktemp("tp2")
    return tmp / "ckpt", _trained(tmp / "run", "model.tensor_model_parallel_size=2",
                                  f"checkpoint.save={tmp / 'ckpt'}", nproc=2)


def test_fsdp2_on_two_ranks_matches_one_process(one_process, fsdp2) -> None:
    _assert_matches(fsdp2[1], one_process, ITERATIONS)


def test_tensor_parallel_on_two_ranks_matches_one_process(one_process, tensor_parallel) -> None:
    _assert_matches(tensor_parallel[1], one_process, ITERATIONS)


# Each also composes the memory settings: recompute and the chunked loss leave the numbers unchanged.
@pytest.mark.parametrize("layout", [
    ["dist.data_parallel_replicate_degree=2", "model.recompute_granularity=full", "model.recompute_method=uniform",
     "model.recompute_num_layers=1", "model.cross_entropy_chunk_size=64"],
    ["model.tensor_model_parallel_size=2", "model.recompute_granularity=selective",
     "dist.fsdp_reshard_after_forward=false"],
], ids=["hsdp-2x2", "tp2-x-fsdp2"])
def test_four_rank_layouts_match_one_process(one_process, layout, tmp_path: Path) -> None:
    records = _trained(tmp_path / "run", *FSDP2, *layout, "checkpoint.save_interval=null", nproc=4)
    _assert_matches(records, one_process, ITERATIONS)


def test_sigkill_and_resume_under_fsdp2_is_bit_identical(fsdp2, tmp_path: Path) -> None:
    save = f"checkpoint.save={tmp_path / 'ckpt'}"
    killed = _pretrain(tmp_path / "run", *FSDP2, save, nproc=2, fault="kill_at_iteration:7")
    assert killed.returncode != 0
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    resumed = _trained(tmp_path / "run", *FSDP2, save, nproc=2)
    for it in range(6, 11):
        assert {k: resumed[it][k] for k in ("loss", "grad_norm", "lr", "weight_decay")} == \
            {k: fsdp2[1][it][k] for k in ("loss", "grad_norm", "lr", "weight_decay")}


def test_fsdp2_checkpoints_move_from_two_ranks_to_one_and_back(fsdp2, tmp_path: Path) -> None:
    ckpt, reference = fsdp2
    one = _trained(tmp_path / "one", *FSDP2, f"checkpoint.load={ckpt / 'iter_0000005'}",
                   f"checkpoint.save={tmp_path / 'one_ckpt'}", "checkpoint.save_interval=2")
    _assert_matches(one, reference, list(range(6, 11)))
    two = _trained(tmp_path / "two", *FSDP2, f"checkpoint.load={tmp_path / 'one_ckpt' / 'iter_0000008'}",
                   nproc=2)
    _assert_matches(two, reference, [9, 10])


def test_a_tensor_parallel_checkpoint_resumes_on_data_parallel(tensor_parallel, tmp_path: Path) -> None:
    ckpt, reference = tensor_parallel
    records = _trained(tmp_path / "run", *FSDP2, f"checkpoint.load={ckpt / 'iter_0000005'}", nproc=2)
    _assert_matches(records, reference, list(range(6, 11)))


def test_native_optimizer_state_does_not_load_into_fsdp2_but_its_weights_do(native, tmp_path: Path) -> None:
    ckpt = native[0] / "iter_0000005"
    refused = _pretrain(tmp_path / "run", *FSDP2, f"checkpoint.load={ckpt}")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"anneal: error: {ckpt}: its optimizer state was saved by torch-adamw-fused (data parallel 1 (native)) "
        "and does not load into fsdp2-adamw (FSDP2 1): the native engine keeps one flat buffer, FSDP2 one tensor "
        "per parameter. Load the weights alone with checkpoint.load_optim=false (Adam's moments restart; the "
        "schedule continues), or resume on the layout it was saved on")
    weights = _trained(tmp_path / "weights", *FSDP2, f"checkpoint.load={ckpt}", "checkpoint.load_optim=false")
    assert sorted(weights) == list(range(6, 11))  # continued from iteration 5 with the planned lr
    assert [weights[i]["lr"] for i in range(6, 11)] == [native[1][i]["lr"] for i in range(6, 11)]
    assert weights[6]["loss"] == pytest.approx(native[1][6]["loss"], rel=1e-5)  # the weights came across


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_fsdp2_in_bf16_compiled_on_one_gpu_matches_the_native_engine(tmp_path: Path) -> None:
    # NCCL, bf16 compute over fp32 FSDP2 parameters, inductor: against the native engine's bf16 run.
    gpu = ["optimizer.bf16=true", "dist.device=cuda", "checkpoint.save_interval=null"]
    native = _trained(tmp_path / "native", *gpu)
    fsdp2 = _trained(tmp_path / "fsdp2", *gpu, *FSDP2, "compile.enable=true")
    _assert_matches(fsdp2, native, ITERATIONS, rel=3e-2)
