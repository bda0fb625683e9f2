"""Catch Your Breath paper (Galashov et al. 2025, arXiv:2510.13879), Figure 4: the five losses at equal data.

Every run trains the same tiny model on the same batches (seed 0) for
TOTAL_STEPS steps, W = 4 for the pause losses. Size: a 2-layer, 64-wide model
(about 0.2M parameters) on 32-token sequences, batch 16; an estimate of 1-2
minutes per run on two CPU cores, so the grid of 5 runs takes about 10 minutes.
The CYB paper fine-tunes a pretrained model; these runs train from scratch, so the
CYB configs keep their countermeasures against the collapse to never pausing.
"""

import sizes

CONFIGS = {
    "ce": "configs/ce.py",
    "pause_ce": "configs/pause_ce.py",
    "ap": "configs/ap.py",
    "va": "configs/va.py",
    "dp": "configs/dp.py",
}
TOTAL_STEPS = 150
BASE = {**sizes.TINY, "total_steps": TOTAL_STEPS, "eval_every": TOTAL_STEPS}
GRID = [{"config": ["ce", "pause_ce", "ap", "va", "dp"]}]
