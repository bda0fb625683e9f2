"""CYB variational loss: uniform prior rho = 1:1:1:1 over stopping steps, W = 4."""

from configs import base


def get_config():
    config = base.get_config()
    config.name = "va"
    config.pause.window = 4
    config.loss.name = "va"
    config.loss.prior = "1:1:1:1"
    base.use_pause_countermeasures(config)
    return config
