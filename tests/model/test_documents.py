"""Packed documents (anneal.model.documents, the model's position_ids / document_ids): a packed window
computes what its documents compute one by one, on both attention kernels, under every recompute setting."""

from __future__ import annotations

import warnings

import pytest
import torch

from anneal.config.model import ModelConfig
from anneal.errors import ConfigError
from anneal.model import qwen3
from anneal.config.dataset import DatasetConfig
from anneal.model.documents import DocumentBoundaries, document_boundaries
from anneal.model.loss import IGNORE_INDEX
from anneal.model.qwen3 import build_model, document_attention, document_mask

EOD, VOCAB, SEQ = 100, 101, 32
ALL = DocumentBoundaries(EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    with warnings.catch_warnings():  # eager flex_attention warns that it is unfused: tests want it so
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        yield


def _megatron_reference(inputs: list[int]) -> tuple[list[int], list[int], list[bool]]:
    """Megatron's loop (_get_ltor_masks_and_position_ids) for one row: positions, document ids, loss mask."""
    positions, documents, counted = list(range(len(inputs))), [0] * len(inputs), [True] * len(inputs)
    previous = 0
    for i, token in enumerate(inputs):
        if token != EOD:
            continue
        counted[i] = False
        for j in range(i + 1, len(inputs)):
            positions[j] -= i + 1 - previous
            documents[j] += 1
        previous = i + 1
    return positions, documents, counted


def test_model_inputs_follow_megatrons_masks_and_positions() -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (3, 40), generator=g)
    tokens[tokens == 0] = EOD  # about one token in four ends a document, some back to back
    tokens[0, 0] = tokens[1, -2] = EOD  # an EOD first, and as the last input
    out = ALL.inputs(tokens)
    assert torch.equal(out["input_ids"], tokens[:, :-1])
    for row in range(3):
        positions, documents, counted = _megatron_reference(tokens[row, :-1].tolist())
        assert out["position_ids"][row].tolist() == positions
        assert out["document_ids"][row].tolist() == documents
        expected = [label if keep else IGNORE_INDEX for label, keep in zip(tokens[row, 1:].tolist(), counted)]
        assert out["labels"][row].tolist() == expected


def test_a_small_window_by_hand() -> None:
    tokens = torch.tensor([[5, 7, EOD, 3, 4, EOD, 9, 2]])
    out = ALL.inputs(tokens)
    assert out["labels"].tolist() == [[7, EOD, IGNORE_INDEX, 4, EOD, IGNORE_INDEX, 2]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0]]  # the EOD keeps its document's position
    assert out["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2]]  # ... and belongs to it


def test_every_flag_off_gives_the_plain_slices_only() -> None:
    tokens = torch.tensor([[5, 7, EOD, 3]])
    out = DocumentBoundaries(EOD).inputs(tokens)
    assert out.keys() == {"input_ids", "labels"}
    assert torch.equal(out["labels"], tokens[:, 1:])
    only_loss = DocumentBoundaries(EOD, eod_mask_loss=True).inputs(tokens)
    assert only_loss.keys() == {"input_ids", "labels"}
    assert only_loss["labels"].tolist() == [[7, EOD, IGNORE_INDEX]]


def test_flags_need_the_end_of_document_id() -> None:
    with pytest.raises(ConfigError, match="dataset.reset_position_ids"):
        DocumentBoundaries(None, reset_attention_mask=True)
    DocumentBoundaries(None)  # nothing to do without flags

    dataset = DatasetConfig(reset_attention_mask=True)
    assert document_boundaries(dataset, EOD) == DocumentBoundaries(EOD, reset_attention_mask=True)
    assert document_boundaries(DatasetConfig(), EOD) == DocumentBoundaries(EOD)


def _packed_windows() -> torch.Tensor:
    """Two windows of SEQ + 1 tokens: whole documents each ended by an EOD, the last one cut off."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for lengths in ((5, 1, 9, 3, 20), (12, 7, 4, 30)):
        row = []
        for n in lengths:
            row += torch.randint(0, EOD, (n,), generator=g).tolist() + [EOD]
        rows.append(row[:SEQ + 1])
    return torch.tensor(rows)


def _documents(window: torch.Tensor) -> list[torch.Tensor]:
    """Each document of a window as its own window ``[1, n + 1]``: its tokens and the EOD that ends it
    (the cut-off last one without), from position 0; those with no label are dropped."""
    pieces, start = [], 0
    for i, token in enumerate(window.tolist()):
        if token == EOD:
            pieces.append(window[start:i + 1])
            start = i + 1
    pieces.append(window[start:])
    return [piece[None] for piece in pieces if len(piece) > 1]


def _model(**settings) -> torch.nn.Module:
    cfg = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      num_query_groups=2, kv_channels=16, vocab_size=VOCAB, seq_length=SEQ, **settings)
    torch.manual_seed(0)
    return build_model(cfg)


def _loss_and_grads(model, windows: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed loss over ``windows`` (model keyword arguments) and the parameters' summed gradients."""
    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for inputs in windows:
        loss = model(**inputs, reduction="sum")
        loss.backward()
        total += loss.detach()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_same(ours, theirs) -> None:
    (loss, grads), (loss_ref, grads_ref) = ours, theirs
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    for name, grad in grads_ref.items():  # fp32 sums in another order: 1e-6 of the largest entry
        atol = 1e-6 * grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=atol, msg=name)


def _one_by_one(model, windows: torch.Tensor):
    plain = DocumentBoundaries(EOD)
    alone = [plain.inputs(doc) for window in windows for doc in _documents(window)]
    return _loss_and_grads(model, alone)


@pytest.mark.parametrize("chunk_size", [0, 7])
@pytest.mark.parametrize("recompute", list(RECOMPUTE))
def test_packed_window_equals_its_documents_one_by_one(recompute: str, chunk_size: int) -> None:
    model = _model(cross_entropy_chunk_size=chunk_size, **RECOMPUTE[recompute])
    windows = _packed_windows()
    _assert_same(_loss_and_grads(model, [ALL.inputs(windows)]), _one_by_one(model, windows))


@pytest.mark.parametrize("chunk_size", [0, 7])
def test_flex_attention_path_gives_the_same_losses(monkeypatch, chunk_size: int) -> None:
    # CUDA's kernel choice, run on CPU: eager (unfused) flex_attention over a BlockMask built on CPU. Its
    # backward raises on CPU (torch 2.13), so the forward only: per-token losses, against sdpa+mask's.
    model, windows = _model(cross_entropy_chunk_size=chunk_size), _packed_windows()
    with torch.no_grad():
        sdpa = model(**ALL.inputs(windows), reduction="none")
        monkeypatch.setattr(qwen3, "document_attention_kernel", lambda *_: "flex_attention")
        flex = model(**ALL.inputs(windows), reduction="none")
        alone = torch.stack([model(**DocumentBoundaries(EOD).inputs(doc), reduction="sum")
                             for window in windows for doc in _documents(window)])
    torch.testing.assert_close(flex, sdpa, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flex.sum(), alone.sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_flex_attention_equals_sdpa_with_the_additive_mask(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 300, 16, generator=g).to(dtype) for heads in (4, 2, 2))  # > 2 blocks
    documents = torch.tensor([[0] * 7 + [1] * 150 + [2] * 143, [0] * 300])
    sdpa, flex = (document_attention(q, k, v, document_mask(documents, dtype, kernel), "cpu")
                  for kernel in ("sdpa+mask", "flex_attention"))
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(flex, sdpa, **tolerance)


def test_the_additive_mask_is_causal_within_documents() -> None:
    mask = document_mask(torch.tensor([[0, 0, 1, 1, 1]]), torch.float32, "sdpa+mask")
    allowed = (mask == 0)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.float32


@pytest.mark.parametrize("missing", ["reset_attention_mask", "eod_mask_loss"])
def test_without_each_flag_the_packed_window_differs(missing: str) -> None:
    model, windows = _model(), _packed_windows()
    names = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
    flags = {name: name != missing for name in names}
    packed = _loss_and_grads(model, [DocumentBoundaries(EOD, **flags).inputs(windows)])
    alone = _one_by_one(model, windows)
    with pytest.raises(AssertionError):
        _assert_same(packed, alone)


def test_position_ids_reach_the_rotary_tables() -> None:
    # Under the document mask, RoPE's scores depend only on the distance between tokens, so a missing
    # position reset changes the packed loss by rounding alone: the equality above cannot catch it.
    # Without the mask it shows: reset positions change what a later document sees of an earlier one.
    model, windows = _model(), _packed_windows()
    positions = DocumentBoundaries(EOD, reset_position_ids=True).inputs(windows)
    plain = DocumentBoundaries(EOD).inputs(windows)
    with torch.no_grad():
        reset = model(**positions, reduction="sum")
        absolute = model(**plain, reduction="sum")
        explicit = model(**plain, position_ids=torch.arange(SEQ).expand(2, SEQ), reduction="sum")
    assert torch.equal(explicit, absolute)  # 0 .. s - 1 given explicitly: the same computation
    assert (reset - absolute).abs() > 1e-4 * absolute.abs()  # rounding alone: about 1e-7


def test_positions_restart_with_each_document_in_the_rotary_tables() -> None:
    cos, sin = qwen3.rotary_cos_sin(SEQ, 16, 1e6, device=torch.device("cpu"), dtype=torch.float32)
    position_ids = ALL.inputs(_packed_windows())["position_ids"]
    row_cos, row_sin = qwen3.rotary_for_positions(cos, sin, position_ids)
    assert row_cos.shape == (2, 1, SEQ, 16)  # broadcast over heads: all of them, or a TP rank's
    start = 6  # the second document of row 0: 5 tokens and an EOD before it
    assert torch.equal(row_cos[0, 0, start:start + 2], cos[:2]) and torch.equal(row_sin[0, 0, start], sin[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_runs_the_flash_kernel_under_the_mask(dtype: torch.dtype) -> None:
    # what the planner counts for sdpa+mask: CPU's flash kernel (no score matrices), not the math one
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 64, 16, generator=g).to(dtype).requires_grad_() for heads in (4, 2, 2))
    mask = document_mask(torch.tensor([[0] * 20 + [1] * 44] * 2), dtype, "sdpa+mask")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        document_attention(q, k, v, mask, "cpu").sum().backward()
    ops = {event.key for event in prof.key_averages()}
    assert {"aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= ops
    assert not any("math" in op or "softmax" in op for op in ops)


def test_the_mask_is_kept_once_for_all_layers_and_no_scores_are() -> None:
    model, windows = _model(), _packed_windows()
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**ALL.inputs(windows))
    square = {ptr for shape, ptr in saved if shape[-2:] == (SEQ, SEQ)}
    assert len([shape for shape, _ in saved if shape[-2:] == (SEQ, SEQ)]) == 3  # one per layer ...
    assert len(square) == 1  # ... all the same [b, 1, s, s] mask: planner.document_bytes counts it once


def test_compiled_blocks_take_the_mask_and_positions() -> None:
    # compile.enable compiles each block; the mask and the gathered tables are made outside and passed in
    model, windows = _model(recompute_granularity="selective"), _packed_windows()
    eager = _loss_and_grads(model, [ALL.inputs(windows)])
    for layer in model.layers:
        layer.compile(backend="aot_eager")  # traced like inductor's input, without the C++ build
    _assert_same(_loss_and_grads(model, [ALL.inputs(windows)]), eager)


def test_the_kernel_is_flex_attention_on_cuda_and_sdpa_with_a_mask_on_cpu() -> None:
    from anneal.devices import describe_attention, document_attention_kernel

    for precision in ("fp32", "bf16", "fp16"):
        assert document_attention_kernel(precision, "cuda") == "flex_attention"
        assert document_attention_kernel(precision, "cpu") == "sdpa+mask"
    assert describe_attention("bf16", "cuda", reset_attention_mask=True) == (
        "attention: flex_attention (compiled, block-sparse) with a document mask (dataset.reset_attention_mask)")
    assert describe_attention("fp32", "cpu", reset_attention_mask=True) == (
        "attention: SDPA flash for CPU with a document mask, additive [b, 1, s, s] "
        "(dataset.reset_attention_mask)")
    assert describe_attention("bf16", "cuda") == "attention: SDPA flash, causal"
    assert describe_attention("fp32", "cuda", grouped_queries=True) == (
        "attention: SDPA memory-efficient, causal, K and V repeated to every query head")


def test_counted_tokens_are_the_labels_not_ignored() -> None:
    windows = _packed_windows()
    labels = ALL.inputs(windows)["labels"]
    assert ALL.counted_tokens(windows) == int((labels != IGNORE_INDEX).sum()) == 2 * SEQ - 7  # 4 + 3 EOD inputs
    assert DocumentBoundaries(EOD, reset_attention_mask=True).counted_tokens(windows) == 2 * SEQ
    assert DocumentBoundaries().counted_tokens(windows) == 2 * SEQ
