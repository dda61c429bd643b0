"""Sections for the run around the model: ``checkpoint.``, ``logger.``, ``profiling.``, ``dist.``,
``compile.``, ``rng.``, ``downstream_eval.``."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

from anneal.errors import ConfigError, check_choice

DIST_BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
WANDB_MODES = ("auto", "online", "offline", "disabled")
LIMIT_RULE = "must be a number of documents (>= 1) or a fraction in (0, 1)"  # lm-eval's --limit
EVAL_MODULES = ("lm_eval", "transformers")  # what downstream_eval.tasks imports (the anneal[eval] extra)


@dataclass
class CheckpointConfig:
    save: str | None = None  # directory of checkpoints; also resumed from when `load` is unset
    load: str | None = None  # a checkpoint directory, or a save directory (its latest checkpoint)
    save_interval: int | None = None  # iterations; None saves only at the end and on SIGTERM
    most_recent_k: int | None = None  # keep the last K checkpoints; None keeps all
    # Write in the background (Megatron-Bridge's name): the loop blocks only while the state is copied; a save
    # becomes latest once written and verified on every rank (README: Checkpoints and exact resume).
    async_save: bool = False
    load_optim: bool = True  # restore the optimizer state on load
    load_rng: bool = True  # restore every rank's RNG state on load
    finetune: bool = False  # load weights only; iteration and scheduler start from zero
    # A Hugging Face model directory whose weights start the run when there is no checkpoint to resume.
    pretrained_checkpoint: str | None = None

    def validate(self) -> None:
        for name in ("save_interval", "most_recent_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"checkpoint.{name} ({value}) must be >= 1 or null")
        self._check_pretrained()

    def _check_pretrained(self) -> None:
        path = self.pretrained_checkpoint
        if path is None:
            return
        if self.finetune:
            raise ConfigError(f"checkpoint.pretrained_checkpoint ({path!r}) and checkpoint.finetune (True) both "
                              "name the starting weights; set one")
        from anneal.hf.hub import looks_like_hub_id  # imports nothing: a hub id is read when the run starts

        if not isinstance(path, str) or not (os.path.isdir(path) or looks_like_hub_id(path)):
            raise ConfigError(f"checkpoint.pretrained_checkpoint ({path!r}) must be a Hugging Face model "
                              "directory (config.json and model.safetensors) or a hub id (org/name)")


@dataclass
class LoggerConfig:
    log_interval: int = 10  # iterations between metric lines
    tensorboard_dir: str | None = None  # default: <run dir>/tensorboard
    progress_bar: bool = True  # the [it/total %] prefix on each metric line
    plot_schedule: bool = True  # at the end, the planned schedule with the applied lr/wd drawn over it
    # Weights & Biases (Megatron-Bridge's names), rank 0 only; needs `pip install 'anneal[wandb]'`.
    wandb_project: str | None = None  # set to log the metrics to W&B
    wandb_exp_name: str | None = None  # the W&B run name; null lets W&B pick one
    wandb_entity: str | None = None  # team or user; null: the API key's default
    wandb_save_dir: str | None = None  # where wandb writes its files; null: the run directory
    wandb_mode: str = "auto"  # auto: $WANDB_MODE if set, else online when $WANDB_API_KEY is set, else offline

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"logger.log_interval ({self.log_interval}) must be >= 1")
        check_choice("logger.wandb_mode", self.wandb_mode, WANDB_MODES)
        for name in ("wandb_exp_name", "wandb_entity", "wandb_save_dir"):
            if getattr(self, name) is not None and not self.wandb_project:
                raise ConfigError(f"logger.{name} ({getattr(self, name)!r}) needs logger.wandb_project")


@dataclass
class ProfilingConfig:
    """A profiling window (Megatron-Bridge's ``ProfilingConfig`` names): iterations start+1 .. end.

    As in Megatron, the steps count completed iterations: the window opens when
    ``profile_step_start`` iterations are done and closes when ``profile_step_end`` are.
    """

    use_pytorch_profiler: bool = False  # torch.profiler over the window: a Chrome trace in <run dir>/profile
    record_memory_history: bool = False  # CUDA only: the allocator's history over the window, as a snapshot
    profile_step_start: int = 10  # the window opens after this many iterations
    profile_step_end: int = 12  # and closes after this many
    profile_ranks: list[int] = field(default_factory=lambda: [0])  # empty: every rank
    record_shapes: bool = False  # operator input shapes in the trace (larger files)

    def validate(self) -> None:
        if self.profile_step_start < 0:
            raise ConfigError(f"profiling.profile_step_start ({self.profile_step_start}) must be >= 0")
        if self.profile_step_end <= self.profile_step_start:
            raise ConfigError(f"profiling.profile_step_end ({self.profile_step_end}) must be > "
                              f"profiling.profile_step_start ({self.profile_step_start})")
        if any(rank < 0 for rank in self.profile_ranks):
            raise ConfigError(f"profiling.profile_ranks ({self.profile_ranks}) must hold ranks >= 0")


@dataclass
class DistributedConfig:
    backend: str = "auto"  # gloo on CPU, nccl on CUDA
    device: str = "auto"  # cuda when available
    # How long a collective may wait for a peer before the job fails (exit 1), naming the stage.
    # 5 minutes covers a checkpoint save of the shipped 8B recipe on a shared file system; fractions work.
    timeout_minutes: float = 5.0
    # PyTorch's engine (Megatron-Bridge's name): FSDP2 `fully_shard` per transformer block and the root,
    # bf16/fp16 compute with fp32 parameters and gradient reduction; needed by tensor parallel.
    use_torch_fsdp2: bool = False
    # HSDP (torchtitan's name): replicas of the FSDP2 group; each shards over data-parallel size / this.
    data_parallel_replicate_degree: int = 1
    fsdp_reshard_after_forward: bool = True  # free gathered parameters after forward (ZeRO-3) or keep them
    # false: reduce gradients once per iteration, in the last microbatch's backward (those before keep the
    # unsharded fp32 gradient, 4 B per parameter of the model, on every rank); true: reduce-scatter after each
    # microbatch, sharded gradients only (torchtitan's way). HSDP's replica all-reduce runs once either way.
    fsdp_grad_sync_each_microbatch: bool = False

    def validate(self) -> None:
        check_choice("dist.backend", self.backend, DIST_BACKENDS)
        if self.data_parallel_replicate_degree != 1 and not self.use_torch_fsdp2:
            raise ConfigError(f"dist.data_parallel_replicate_degree ({self.data_parallel_replicate_degree}) "
                              "needs dist.use_torch_fsdp2=true (HSDP replicates FSDP2 groups)")
        check_choice("dist.device", self.device, DEVICES)
        if self.backend == "nccl" and self.device == "cpu":
            raise ConfigError("dist.backend ('nccl') needs dist.device 'cuda' or 'auto', not 'cpu'")
        if not 0 < self.timeout_minutes <= 24 * 60:
            raise ConfigError(f"dist.timeout_minutes ({self.timeout_minutes}) must be in (0, 1440]")


@dataclass
class CompileConfig:
    """``torch.compile`` of each transformer block (torchtitan's names), compiled at the first forward."""

    enable: bool = False  # compile every transformer block
    backend: str = "inductor"  # a torch.compile backend: inductor (fast kernels), aot_eager (checks tracing)

    def validate(self) -> None:
        check_choice("compile.backend", self.backend, COMPILE_BACKENDS)


@dataclass
class RNGConfig:
    seed: int = 1234  # initial weights, dropout and every other torch RNG

    def validate(self) -> None:
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"rng.seed ({self.seed}) must be in [0, 2**63)")


@dataclass
class DownstreamEvalConfig:
    """lm-evaluation-harness tasks scored on the live model during training (``anneal.evals``), logged as
    ``eval/<task>/<metric>``; needs ``pip install 'anneal[eval]'``."""

    tasks: list[str] = field(default_factory=list)  # lm-eval task names (or groups); empty: no downstream evals
    interval: int | None = None  # iterations between evaluations; None: only after the last iteration
    limit: float | None = None  # documents per task (lm-eval's --limit; below 1: a fraction); None: all
    include_path: str | None = None  # a folder of local task YAMLs (lm-eval's --include_path)
    batch_size: int = 8  # requests per forward

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):  # downstream_eval.tasks=hellaswag,arc_easy from the command line
            self.tasks = [task.strip() for task in self.tasks.split(",") if task.strip()]

    def describe(self) -> str:
        """One line for the start-up log and the dry run."""
        if not self.tasks:
            return "downstream evals: off (downstream_eval.tasks is empty)"
        when = f"every {self.interval} iterations and " if self.interval else ""
        limit = f", {self.limit:g} documents per task" if self.limit else ""
        return f"downstream evals: {', '.join(self.tasks)} (lm-eval{limit}) {when}after the last iteration"

    def validate(self) -> None:
        eval_limit(self.limit, "downstream_eval.limit")
        if any(not isinstance(task, str) or not task.strip() for task in self.tasks):
            raise ConfigError(f"downstream_eval.tasks ({self.tasks!r}) must be lm-eval task names")
        missing = [name for name in EVAL_MODULES if importlib.util.find_spec(name) is None]  # none imported
        if self.tasks and missing:
            raise ConfigError(f"downstream_eval.tasks ({self.tasks!r}) needs lm-evaluation-harness and "
                              f"transformers ({', '.join(missing)} not installed): pip install 'anneal[eval]'")


def eval_limit(value: float | None, field: str) -> int | float | None:
    """lm-eval's ``--limit`` from ``field``: a number of documents per task (a whole number >= 1) or a fraction
    of them in (0, 1); None: all. ConfigError naming the field for anything else (1.5 is not rounded)."""
    if value is None:
        return None
    if not value > 0 or (value >= 1 and not float(value).is_integer()):
        raise ConfigError(f"{field} ({value!r}) {LIMIT_RULE}")
    return int(value) if value >= 1 else value
