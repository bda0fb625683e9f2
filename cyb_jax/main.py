"""Train and evaluate a model: `python -m cyb_jax.main --config=configs/ap.py`.

Flags:
  --config=PATH   an ml_collections config file; override its fields with
                  --config.section.field=value
  --workdir=DIR   where checkpoints, metrics and the summary go
                  (default: runs/<config.name>)

Multi-process runs (TPU pods, SLURM, Open MPI) start jax.distributed on their own;
elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I
to every process. --distributed=off keeps a run in one process.

Rerunning the same command resumes from the newest checkpoint in the workdir.
On SIGTERM, the signal TPU and cluster schedulers send before preempting, the
run saves a checkpoint at the step it reached, waits until it is committed and
exits with status 143 (128 + SIGTERM), so rerunning the command loses no steps.
"""

import os
import shlex
import sys

# TensorFlow only feeds data here. Level 3 hides its C++ GPU-probing errors on machines
# without CUDA; data errors still reach Python as exceptions. It must be set before
# TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cyb_jax import configuration
from cyb_jax import distributed
from cyb_jax import preemption

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/ap.py.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<config.name>.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    distributed.MODES,
    "Start jax.distributed: 'auto' when the flags below, SLURM, Open MPI or a TPU pod say the "
    "run spans several processes; 'on' always; 'off' never.",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0's coordinator service, for a multi-process run.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Index of this process, 0 to num_processes - 1."
)
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for all processes to reach the coordinator."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # jax.distributed must start before anything touches the JAX backend, so the
    # training code is imported only afterwards.
    distributed.initialize(
        _DISTRIBUTED.value,
        coordinator_address=_COORDINATOR_ADDRESS.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        timeout_seconds=_INITIALIZATION_TIMEOUT.value,
    )
    try:
        # Checked before TensorFlow and the data pipeline load, so a bad value fails at once.
        configuration.validate(_CONFIG.value)
    except configuration.ConfigError as error:
        sys.exit(f"Error: {error}")
    from cyb_jax import train

    if not flags.FLAGS["verbosity"].present:
        # Our own progress goes to stdout; keep the INFO chatter of TFDS and seqio out of the console.
        logging.set_verbosity(logging.WARNING)
    import tensorflow_datasets as tfds

    from cyb_jax import data

    data.hide_accelerators_from_tensorflow()
    tfds.disable_progress_bar()

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", config.name)
    try:
        train.train_and_evaluate(config, workdir)
    except (
        configuration.ConfigError,
        train.NonFiniteError,
        train.checkpointing.CheckpointError,
    ) as error:
        sys.exit(f"Error: {error}")
    except preemption.Preempted as stop:
        command = shlex.join(["python", "-m", "cyb_jax.main", *sys.argv[1:]])
        logging.warning("%s", stop)
        print(f"{stop} Rerun the same command to resume from it: {command}", flush=True)
        sys.exit(preemption.EXIT_CODE)
    except KeyboardInterrupt:
        sys.exit(
            f"Interrupted. Rerun the same command to resume from the newest checkpoint in "
            f"{os.path.abspath(workdir)}/checkpoints."
        )


def run() -> None:
    """Check the command line, then hand over to absl."""
    arguments = sys.argv[1:]
    wants_help = any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in arguments)
    try:
        if not wants_help:
            configuration.check_command_line(arguments)
    except configuration.ConfigError as error:
        sys.exit(f"Error: {error}")
    app.run(main)


if __name__ == "__main__":
    run()
