"""Train and evaluate a model: `python -m cyb_jax.main --config=configs/ap.py`.

Flags:
    --config=PATH          an ml_collections config file; fields are overridden with
                                                  --config.section.field=value
    --workdir=DIR          where checkpoints, metrics and the summary go
                                                  (default: runs/<config.name>)

Rerunning the same command resumes from the newest checkpoint in the workdir.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cyb_jax import configuration

# TensorFlow only feeds data here; keep its C++ start-up chatter (GPU probing) out of the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/ap.py.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<config.name>.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # Imported here so that multi-host initialisation can come first in later versions
    # and nothing touches the JAX backend during flag parsing.
    from cyb_jax import train

    if not flags.FLAGS["verbosity"].present:
        # Our own progress goes to stdout; keep the INFO chatter of TFDS and seqio out of the console.
        logging.set_verbosity(logging.WARNING)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", config.name)
    try:
        train.train_and_evaluate(config, workdir)
    except configuration.ConfigError as error:
        sys.exit(f"Error: {error}")


def run() -> None:
    """Check the command line, then hand over to absl."""
    try:
        configuration.check_command_line(sys.argv[1:])
    except configuration.ConfigError as error:
        sys.exit(f"Error: {error}")
    app.run(main)


if __name__ == "__main__":
    run()
