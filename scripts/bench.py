#!/usr/bin/env python
"""Every anneal benchmark side by side in one run: `python scripts/bench.py [--repeats 5] [--readme README.md]`.

Prints one table, writes bench_results/bench.json, exits 1 when a figure is far past its threshold.
"""

import sys

from anneal.bench.report import main

if __name__ == "__main__":
    sys.exit(main())
