"""Catch Your Breath paper (Galashov et al. 2025, arXiv:2510.13879), Figure 5: hyper-parameter sweep of the three CYB losses (W = 4).

  ap  world stop omega uniform 1:1:1:1 or bimodal 4:1:1:4 (gamma 1), and
      discount gamma 0.99 with omega 0:0:0:1
  va  priors 1:1:1:1, 4:1:1:4, 11:3:3:3
  dp  alpha 0.01 and 0.1, each with those three priors

12 runs of the tiny model of figure4.py (150 steps each; an estimate of
15-25 minutes for the grid on two CPU cores).
"""

import sizes

CONFIGS = {"ap": "configs/ap.py", "va": "configs/va.py", "dp": "configs/dp.py"}
TOTAL_STEPS = 150
BASE = {**sizes.TINY, "total_steps": TOTAL_STEPS, "eval_every": TOTAL_STEPS}
PRIORS = ["1:1:1:1", "4:1:1:4", "11:3:3:3"]
GRID = [
    {"config": ["ap"], "loss.world_stop": ["1:1:1:1", "4:1:1:4"]},
    {"config": ["ap"], "loss.gamma": [0.99]},
    {"config": ["va"], "loss.prior": PRIORS},
    {"config": ["dp"], "loss.alpha": [0.01, 0.1], "loss.prior": PRIORS},
]
