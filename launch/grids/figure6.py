"""Catch Your Breath paper (Galashov et al. 2025, arXiv:2510.13879), Figure 6: data regimes for ce, pause_ce and ap.

Regime PxD is P passes over D times the base budget of BASE_ROWS packed rows
(data.train_rows): 1x1 and 2x1 read the same rows once and twice, 1x2 and 1x3
read two and three times as many rows once. Larger budgets contain smaller ones.
These runs train from scratch; launch/paper.py runs the same regimes as the CYB
paper did, fine-tuning a pretrained model, and writes the report.
12 runs of the tiny model of figure4.py; an estimate of 30-40 minutes for the
grid on two CPU cores.
"""

import sizes

CONFIGS = {"ce": "configs/ce.py", "pause_ce": "configs/pause_ce.py", "ap": "configs/ap.py"}
BASE = sizes.TINY
BATCH_SIZE = BASE["data.batch_size"]
BASE_ROWS = 1600
REGIMES = {
    f"{passes}x{data}": {
        "data.train_rows": BASE_ROWS * data,
        "total_steps": passes * data * BASE_ROWS // BATCH_SIZE,
        "eval_every": passes * data * BASE_ROWS // BATCH_SIZE,
    }
    for passes, data in ((1, 1), (2, 1), (1, 2), (1, 3))
}
GRID = [{"config": ["ce", "pause_ce", "ap"], "regime": REGIMES}]
