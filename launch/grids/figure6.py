"""Catch Your Breath paper (Galashov et al. 2025, arXiv:2510.13879), Figure 6: data regimes for ce, pause_ce and ap.

The CYB paper's regime PxD is P passes over D times the base data. Here a regime is
a multiple of BASE_STEPS optimizer steps: 1x1 = 1, 2x1 = 2, 1x2 = 2, 1x3 = 3.
NOTE: the bundled Shakespeare corpus is small (one epoch is roughly 600 steps of
batch 16 x 32 tokens, an estimate), and no config field caps the data, so 2x1
and 1x2 train on the same batches and differ only in their run names here. On
a large corpus, 2x1 would need a data cap to repeat its data.
12 runs of the tiny model of figure4.py; an estimate of 30-40 minutes for the
grid on two CPU cores.
"""

CONFIGS = {"ce": "configs/ce.py", "pause_ce": "configs/pause_ce.py", "ap": "configs/ap.py"}
BASE_STEPS = 100
BASE = {
    "model.num_layers": 2,
    "model.d_model": 64,
    "model.num_heads": 4,
    "model.mlp_dim": 192,
    "data.seq_len": 32,
    "data.batch_size": 16,
    "data.eval_max_batches": 20,
    "checkpoint_every": 50,
    "log_every": 25,
}
REGIMES = {
    name: {"total_steps": BASE_STEPS * multiple, "eval_every": BASE_STEPS * multiple}
    for name, multiple in (("1x1", 1), ("2x1", 2), ("1x2", 2), ("1x3", 3))
}
GRID = [{"config": ["ce", "pause_ce", "ap"], "regime": REGIMES}]
