"""``AnnealLM``: each request type scores as lm-eval's hf backend scores the exported model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from conftest import QUESTIONS, TEXTS  # noqa: E402


@pytest.fixture(scope="module")
def both(byte_run):
    """(anneal's adapter over the checkpoint's model, lm-eval's HFLM over its export), fp32 on the CPU."""
    from lm_eval.models.huggingface import HFLM

    from anneal.evals.adapter import AnnealLM
    from anneal.evals.cli import load_model
    from anneal.hf.exporter import open_checkpoint
    from anneal.hf.tokenizer_files import run_tokenizer

    checkpoint, export = byte_run
    stored = open_checkpoint(checkpoint)
    model = load_model(stored)
    tokenizer = run_tokenizer(stored.config["dataset"], stored.model.vocab_size).load(stored.model)
    ours = AnnealLM(model, tokenizer, max_length=stored.model.seq_length, batch_size=4)
    return ours, HFLM(pretrained=str(export), dtype="float32", device="cpu", batch_size=1)


def _requests(kind: str, arguments: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_loglikelihoods_match_the_hf_backend_on_each_request(both) -> None:
    ours, hf = both
    pairs = [(f"Q: {q}\nA:", choice) for q, choices, _ in QUESTIONS for choice in choices]
    pairs += [("", "empty context: EOS first"), ("trailing spaces move ", "to the continuation")]
    got, expected = ours.loglikelihood(_requests("loglikelihood", pairs)), hf.loglikelihood(
        _requests("loglikelihood", pairs))
    assert [g for _, g in got] == [g for _, g in expected]
    assert torch.allclose(torch.tensor([lp for lp, _ in got]), torch.tensor([lp for lp, _ in expected]),
                          atol=1e-4, rtol=0)


def test_rolling_loglikelihoods_over_several_windows_match_the_hf_backend(both) -> None:
    ours, hf = both
    assert len(TEXTS[0].encode()) > 2 * ours.max_length  # three windows of 32 tokens
    requests = _requests("loglikelihood_rolling", [(text,) for text in TEXTS])
    got, expected = ours.loglikelihood_rolling(requests), hf.loglikelihood_rolling(requests)
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=0)


def test_greedy_generation_stops_where_the_hf_backend_stops(both) -> None:
    ours, hf = both
    arguments = [("Q: What is 1 plus 1?\nA:", {"until": ["\n"], "max_gen_toks": 8}),
                 ("abc", {"until": ["c", "\n"], "max_gen_toks": 5}),
                 ("A much longer prompt than the others, cut from the left", {"max_gen_toks": 4})]
    requests = _requests("generate_until", arguments)
    assert ours.generate_until(requests) == hf.generate_until(requests)


def test_scoring_leaves_the_model_in_train_mode_as_it_found_it(both) -> None:
    ours, _ = both
    ours.model.train()
    try:
        ours.loglikelihood(_requests("loglikelihood", [("a", "b")]))
        assert ours.model.training
    finally:
        ours.model.eval()


def test_sampling_is_refused(both) -> None:
    from anneal.errors import ConfigError

    ours, _ = both
    with pytest.raises(ConfigError, match="decodes greedily"):
        ours.generate_until(_requests("generate_until", [("a", {"do_sample": True, "temperature": 1.0})]))

