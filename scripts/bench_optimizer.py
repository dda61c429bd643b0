"""Optimizer-step benchmark: anneal vs torch.optim.AdamW(fused=True), ~50M fp32 parameters, this machine.

Usage: python scripts/bench_optimizer.py [--params 50000000] [--repeats 7]
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from anneal.optim.bench import format_table, run

    print(format_table(run(args.params, args.repeats)))


if __name__ == "__main__":
    main()
