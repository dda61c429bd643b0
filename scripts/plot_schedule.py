#!/usr/bin/env python
"""Preview a run's learning rate and weight decay: `python scripts/plot_schedule.py [overrides]`.

Examples:
    python scripts/plot_schedule.py recipe=qwen3_4b       # outputs/schedules/schedule.png + .csv
    python scripts/plot_schedule.py recipe=qwen3_4b --compare scheduler=cosine  # two curves
    python scripts/plot_schedule.py -m recipe=qwen3_4b scheduler.lr_wsd_decay_style=linear,minus_sqrt
"""

from anneal.cli.plot_schedule import main

if __name__ == "__main__":
    main()
