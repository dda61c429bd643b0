#!/usr/bin/env python
"""Compare a parent run and its anneal branches: `python scripts/compare_runs.py RUN_DIR [RUN_DIR ...]`.

Examples:
    python scripts/compare_runs.py runs/parent_run runs/b20k_run runs/b40k_run   # compare_runs.png + a table
    python scripts/compare_runs.py runs/*_run --labels parent,b20k,b40k --metrics loss,valid_loss* -o b.png
"""

import sys

from anneal.cli.compare_runs import main

if __name__ == "__main__":
    sys.exit(main())
