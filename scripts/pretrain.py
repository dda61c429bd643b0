#!/usr/bin/env python
"""Pretrain a language model: `.venv/bin/python scripts/pretrain.py [hydra overrides]`, or under torchrun.

Examples (README: after the two set-up commands):
    .venv/bin/python scripts/pretrain.py                              # tiny Qwen3 on CPU, 23-32 s
    .venv/bin/python scripts/pretrain.py scheduler=wsd dry_run=true   # print the derived schedule and exit
    .venv/bin/torchrun --nproc-per-node 2 scripts/pretrain.py optimizer=distributed_fused_adam
"""

from anneal.cli.pretrain import main

if __name__ == "__main__":
    main()
