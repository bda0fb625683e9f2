"""Orbax checkpoints holding the train state and the data position together.

A checkpoint step directory has two items: `state` (the TrainState arrays) and
`data` (a JSON record with the index of the next training batch). Restoring
goes into an abstract target built from the current mesh, so a checkpoint lands
with the shardings a fresh initialisation would have.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

STATE = "state"
DATA = "data"


def make_manager(directory: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_names=(STATE, DATA)
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, batch_index: int) -> None:
    """Start saving `state` and the data position; the write completes in the background."""
    manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(state),
                DATA: ocp.args.JsonSave({"batch_index": batch_index}),
            }
        ),
        force=True,
    )


class CheckpointError(RuntimeError):
    """A checkpoint that did not reach the disk."""


def wait_until_committed(manager: ocp.CheckpointManager, step: int) -> None:
    """Block until every started save has finished, then check that `step` is on disk.

    `wait_until_finished` re-raises an error of the background commit (Orbax
    0.12.8). The step check is a backstop, because Orbax's finalize step logs
    some errors instead of raising them. Raises CheckpointError when the
    checkpoint at `step` is missing after the wait.
    """
    manager.wait_until_finished()
    if step not in manager.all_steps(read=True):
        raise CheckpointError(
            f"The checkpoint at step {step} was not committed to {manager.directory} because "
            "the background save failed (the Orbax error is in the log above). Check that "
            "the directory is writable and has free space, then rerun the same command to "
            "resume from the newest committed checkpoint."
        )


def abstract_target(abstract_state: Any, shardings: Any) -> Any:
    """Attach the current mesh's shardings to the shapes of a state tree."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, int]:
    """Restore the state at `step` into `target` and return it with the data position."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(target), DATA: ocp.args.JsonRestore()}
        ),
    )
    return restored[STATE], int(restored[DATA]["batch_index"])


def restore_params(directory: str) -> tuple[Any, int]:
    """Read the parameters of the newest checkpoint under `directory` as host arrays."""
    checkpoint_dir = os.path.join(os.path.abspath(directory), "checkpoints")
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(
            f"config.init_from={directory!r} has no checkpoints/ directory. Point it at the "
            "workdir of a run that saved at least one checkpoint."
        )
    with ocp.CheckpointManager(checkpoint_dir, item_names=(STATE, DATA)) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"No finished checkpoint in {checkpoint_dir}.")
        logging.info("Reading parameters from %s at step %d.", checkpoint_dir, step)
        restored = manager.restore(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore()})
        )
    return restored[STATE]["params"], step
