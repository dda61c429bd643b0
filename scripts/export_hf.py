#!/usr/bin/env python
"""Export an anneal checkpoint as a Hugging Face Qwen3 model: `python scripts/export_hf.py CHECKPOINT OUT`.

Examples:
    python scripts/export_hf.py runs/ck out/qwen3-tiny                      # the latest checkpoint
    python scripts/export_hf.py runs/ck/iter_0000100 out/q --max-shard-size 2GB
Then `transformers.AutoModelForCausalLM.from_pretrained("out/qwen3-tiny")`.
"""

from anneal.hf.cli import main

if __name__ == "__main__":
    main()
