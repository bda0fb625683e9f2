"""No-pause baseline: a plain language model trained with cross-entropy (W = 1)."""

from configs import base


def get_config():
    config = base.get_config()
    config.name = "ce"
    config.pause.window = 1
    config.loss.name = "ce"
    return config
