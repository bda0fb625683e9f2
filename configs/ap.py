"""CYB anytime prediction (the main job): omega = 0:0:0:1, gamma = 1, W = 4.

These are the CYB paper's best hyper-parameters. Trained from scratch at this
scale, plain CYB-AP learns never to pause; the countermeasures below are beyond
the paper and keep every pause step trained (see README, "Pauses must be used").
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
