"""``AnnealLM``: lm-evaluation-harness scores a live anneal model through its ``LM`` API.

The model is any module whose ``forward(input_ids [b, s])`` returns logits ``[b, s, V]`` (a bare
``Qwen3Model``, or one wrapped by FSDP2 or tensor parallelism), with the Hugging Face tokenizer its export
carries. Requests are encoded, truncated, batched (padded on the right) and scored as lm-eval's ``hf``
backend does with that export (``max_length`` = ``model.seq_length``), so the metrics match it: log-softmax
in fp32, the prefix token (BOS, else EOS) before an empty context, rolling windows of ``max_length`` tokens,
greedy generation up to a stop sequence, EOS or ``max_gen_toks``.

Ranks. lm-eval runs whole on every rank (its own world size is 1: every rank builds the same requests);
this adapter splits each call's requests across the data-parallel ``group`` (longest first, rank ``r``
takes every ``n``-th), scores its share, and all-gathers the results, so every rank returns them all. A
sharded model (FSDP2, tensor parallel) makes collectives in every forward, so the ranks run in lockstep:
before each forward they agree (one all-reduce) whether anyone still has work, and a rank that has none
runs a one-token dummy forward until no rank has. Ranks of one tensor-parallel group share a
data-parallel rank, hence the same requests and the same shapes. ``group=None``: one process, no
collectives.

This module imports lm_eval (and torch): ``anneal.evals.harness`` imports it only when an evaluation runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from anneal.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf backend's default


class Lockstep:
    """Splits work over a data-parallel group and keeps its ranks' forward calls in step (see the module)."""

    def __init__(self, group: Any | None, device: torch.device) -> None:
        import torch.distributed as dist

        self.group = group
        self.device = device
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0

    def share(self, costs: Sequence[int]) -> list[int]:
        """This rank's item indices, costliest first: every ``size``-th of all items sorted by cost."""
        order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
        return order[self.rank::self.size]

    def anyone_busy(self, busy: bool) -> bool:
        """Whether any rank of the group still has a forward to run (one all-reduce)."""
        if self.group is None:
            return busy
        import torch.distributed as dist

        flag = torch.tensor([int(busy)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def gather(self, mine: dict[int, R], count: int) -> list[R]:
        """Every rank's results, in item order, on every rank."""
        if self.group is None:
            return [mine[i] for i in range(count)]
        import torch.distributed as dist

        parts: list[dict[int, R] | None] = [None] * self.size
        dist.all_gather_object(parts, mine, group=self.group)
        merged = {i: r for part in parts for i, r in (part or {}).items()}
        return [merged[i] for i in range(count)]


class AnnealLM(TemplateLM):
    """lm-eval's ``LM`` over ``model`` (logits from ids) and ``tokenizer`` (a Hugging Face tokenizer)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_length: int,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 group: Any | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token: lm-eval needs one to end text and to prefix "
                              "an empty context")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self._device = torch.device(device) if device is not None else _model_device(model)
        self.lockstep = Lockstep(group, self._device)

    # --- tokenization, as lm-eval's hf backend does it ---------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}  # the text already starts with the prefix token
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- lm-eval's three request types ------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives it) per (strings, ids, ids)."""
        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        for context, continuation in pairs:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"a request of {len(context)} context and {len(continuation)} continuation "
                                 f"tokens cannot be scored in windows of {self.max_length}")
        return self._sharded(pairs, [len(c) + len(t) for c, t in pairs], self._score_batch)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood, in disjoint windows of at most ``max_length`` predicted tokens."""
        windows, owner = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[index] += logprob
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop sequence (EOS's text is always one)."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        jobs = []
        for context, gen_kwargs in (request.args for request in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ConfigError(f"a task asks to sample ({gen_kwargs}): anneal's evaluation decodes "
                                  "greedily")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            room = self.max_length - kwargs["max_gen_toks"]
            if room <= 0:
                raise ConfigError(f"a task asks for {kwargs['max_gen_toks']} generated tokens: no room for a "
                                  f"context in {self.max_length}")
            jobs.append((self.tok_encode(context)[-room:], until, kwargs["max_gen_toks"]))
        return self._sharded(jobs, [len(ids) for ids, _, _ in jobs], self._generate_batch)

    # --- scoring ----------------------------------------------------------------------------------------

    def _sharded(self, items: list[T], costs: list[int], run: Callable[[list[T]], list[R]]) -> list[R]:
        """``run`` over this rank's share of ``items`` in batches, then every rank's results, in order."""
        mine = self.lockstep.share(costs)
        results: dict[int, R] = {}
        with self._scoring():
            for start in range(0, len(mine), self.batch_size):
                batch = mine[start:start + self.batch_size]
                results.update(zip(batch, run([items[i] for i in batch])))
            while self.lockstep.anyone_busy(False):  # others still score: keep their collectives company
                self.model(torch.zeros(1, 1, dtype=torch.long, device=self._device))
        return self.lockstep.gather(results, len(items))

    @contextlib.contextmanager
    def _scoring(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Logits of ``rows`` padded on the right with 0 (causal: padding never reaches a real position)."""
        self.lockstep.anyone_busy(True)
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        return self.model(ids.to(self._device))

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        inputs = [(context + continuation)[-(self.max_length + 1):][:-1] for context, continuation in pairs]
        logits = self._forward(inputs)
        sums, greedy = [], []
        for row, ids, (_, continuation) in zip(logits, inputs, pairs):
            logprobs = row[len(ids) - len(continuation):len(ids)].float().log_softmax(-1)
            target = torch.tensor(continuation, device=logprobs.device)
            sums.append(logprobs.gather(-1, target[:, None]).sum())
            greedy.append((logprobs.argmax(-1) == target).all())
        return list(zip(torch.stack(sums).tolist(), torch.stack(greedy).tolist()))

    def _generate_batch(self, jobs: list[tuple[list[int], list[str], int]]) -> list[str]:
        rows = [list(context) for context, _, _ in jobs]
        generated: list[list[int]] = [[] for _ in jobs]
        active = list(range(len(jobs)))
        while active:
            logits = self._forward([rows[i] for i in active])
            last = torch.tensor([len(rows[i]) - 1 for i in active], device=logits.device)
            chosen = logits[torch.arange(len(active), device=logits.device), last].argmax(-1).tolist()
            still = []
            for i, token in zip(active, chosen):
                _, until, max_gen_toks = jobs[i]
                if token == self.eot_token_id:
                    continue
                rows[i].append(token)
                generated[i].append(token)
                text = self.tok_decode(generated[i])
                if len(generated[i]) < max_gen_toks and not any(stop and stop in text for stop in until):
                    still.append(i)
            active = still
        return [postprocess_generated_text(self.tok_decode(tokens), until, None)
                for tokens, (_, until, _) in zip(generated, jobs)]


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu")
    local = getattr(parameter, "to_local", None)  # a DTensor (FSDP2, tensor parallel): its shard's device
    return local().device if local is not None else parameter.device
