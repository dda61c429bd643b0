#!/usr/bin/env python
"""Score an anneal checkpoint on lm-evaluation-harness tasks (needs `pip install 'anneal[eval]'`).

Examples:
    python scripts/eval.py runs/ck --tasks my_mc --include-path tasks/            # the latest checkpoint
    python scripts/eval.py runs/ck/iter_0000100 --tasks hellaswag,arc_easy --limit 200 --output r.json
Same as the `anneal-eval` command.
"""

import sys

from anneal.evals.cli import main

if __name__ == "__main__":
    sys.exit(main())
