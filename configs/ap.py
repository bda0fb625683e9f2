"""CYB anytime prediction (the main job): omega = 0:0:0:1, gamma = 1, W = 4.

These are the best hyper-parameters of Galashov et al. 2025 (arXiv:2510.13879).
Trained from scratch at this scale, plain CYB-AP learns never to pause. The DK
prior and the auxiliary step cross-entropy set below go beyond that paper: they
keep every pause step trained, and the quick-start run then averages about 0.4
pauses per token after 400 steps (the README's table has the measurements).
"""

from configs import base


def get_config():
    config = base.get_config()
    config.name = "ap"
    config.pause.window = 4
    config.loss.name = "ap"
    # Empty means 0:...:0:1 for any window, so --config.pause.window=2 needs no other change.
    config.loss.world_stop = ""
    config.loss.gamma = 1.0
    base.use_pause_countermeasures(config)
    return config
