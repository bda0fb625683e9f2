"""CYB distributional penalty: CYB-AP plus alpha * KL(rho || s), rho = 1:1:1:1, alpha = 0.01, W = 4."""

from configs import base


def get_config():
    config = base.get_config()
    config.name = "dp"
    config.pause.window = 4
    config.loss.name = "dp"
    config.loss.prior = "1:1:1:1"
    config.loss.alpha = 0.01
    base.use_pause_countermeasures(config)
    return config
