"""Start JAX's multi-controller runtime when a run spans several processes.

`initialize` must run before anything touches the JAX backend (devices,
arrays, jit), so `main.py` calls it first. It decides from the flags and the
environment whether the run is distributed:

  explicit  --coordinator_address / --num_processes / --process_id, or
            JAX_COORDINATOR_ADDRESS in the environment
  slurm     a SLURM job step with more than one task (srun)
  mpi       an Open MPI job with more than one rank (mpirun)
  tpu       a Cloud TPU VM (TPU chips visible) or a GKE TPU pod with several
            workers in TPU_WORKER_HOSTNAMES

For the last three, `jax.distributed.initialize()` reads the coordinator,
process count and process id from the cluster itself.
"""

import glob
import os
from typing import Mapping

import jax
from absl import logging

MODES = ("auto", "on", "off")


def tpu_chips_visible() -> bool:
    """Whether this host has TPU chips: /dev/accel* (TPU v2-v4) or /dev/vfio/N (v5e and later)."""
    # NOTE: a heuristic on device files; `--distributed=on` or `off` overrides it.
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def detect_cluster(
    environ: Mapping[str, str],
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    tpu_chips: bool = False,
) -> str | None:
    """Return how the run spans processes ('explicit', 'slurm', 'mpi', 'tpu'), or None for one process."""
    if coordinator_address or num_processes is not None or process_id is not None:
        return "explicit"
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    slurm_keys = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(key in environ for key in slurm_keys) and int(environ["SLURM_NTASKS"]) > 1:
        return "slurm"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    hostnames = [name for name in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if name]
    if len(hostnames) > 1 or tpu_chips:
        return "tpu"
    return None


def initialize(
    mode: str = "auto",
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_seconds: int = 300,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """Call `jax.distributed.initialize` if `mode` is 'on', or 'auto' and a cluster is detected.

    Returns the detected cluster kind ('explicit', 'slurm', 'mpi', 'tpu',
    'forced' for mode 'on' without one), or None when the run stays in one process.
    """
    if mode not in MODES:
        raise ValueError(f"Invalid --distributed={mode!r}; expected one of {', '.join(MODES)}.")
    if mode == "off":
        return None
    environ = os.environ if environ is None else environ
    kind = detect_cluster(
        environ,
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        tpu_chips=tpu_chips_visible(),
    )
    if kind is None and mode == "auto":
        return None
    kind = kind or "forced"
    logging.info(
        "Starting jax.distributed (%s): coordinator %s, %s processes, process id %s.",
        kind,
        coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", "from the cluster"),
        num_processes if num_processes is not None else "from the cluster",
        process_id if process_id is not None else "from the cluster",
    )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_seconds,
    )
    return kind
