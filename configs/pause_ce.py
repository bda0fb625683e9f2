"""Pauses with cross-entropy at the last step ("think before you speak"): W - 1 = 3 pauses per token."""

from configs import base


def get_config():
    config = base.get_config()
    config.name = "pause_ce"
    config.pause.window = 4
    config.loss.name = "pause_ce"
    return config
