"""``python scripts/bench.py``: every benchmark in one run, printed as a table and written as JSON."""
