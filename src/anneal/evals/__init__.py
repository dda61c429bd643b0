"""Downstream evaluations through lm-evaluation-harness (the ``anneal[eval]`` extra).

``anneal.evals.harness`` (imports neither lm_eval nor torch until called): ``run_downstream`` for the
training loop, ``evaluate_tasks``, ``run_tokenizer``. ``anneal.evals.adapter``: ``AnnealLM``, lm-eval's
``LM`` API over a live model. ``anneal.evals.cli``: the ``anneal-eval`` command. Importing this package
imports nothing else.
"""
