"""Orbax checkpoints holding the train state and the data position together.

A checkpoint step directory has two items: `state` (the TrainState arrays) and
`data` (a JSON record with the index of the next training batch and the
optimizer definition). Restoring goes into an abstract target built from the
current mesh, so a checkpoint lands with the shardings a fresh initialisation
would have.

Orbax 0.12.8 writes a step into `<step>.orbax-checkpoint-tmp-<time>` and
renames it to `<step>` when every item is written, so a kill during a save
leaves only that temporary directory. Orbax lists only directories named by a
bare step number, so the temporary one is never restored or counted as the
latest step. `make_manager` also removes it at start.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from cyb_jax import writers

STATE = "state"
DATA = "data"


def make_manager(directory: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """Open the checkpoint directory of the run that owns it.

    Removes the temporary directories of saves that did not finish, so only the
    run writing to `directory` may call this. Readers of another run's
    checkpoints use a plain `ocp.CheckpointManager`.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    # Explicit handlers let `item_metadata` read the saved shapes before a restore.
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()},
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    batch_index: int,
    optimizer_definition: dict[str, Any] | None = None,
) -> None:
    """Start saving `state` and the data position; the write completes in the background.

    `optimizer_definition` contains the optimizer settings that give the saved
    optimizer state its meaning. A resume compares it with its own.
    """
    record = {"batch_index": batch_index}
    if optimizer_definition is not None:
        record["optimizer"] = optimizer_definition
    manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(state),
                DATA: ocp.args.JsonSave(record),
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


class DamagedCheckpointError(CheckpointError):
    """A committed checkpoint whose files cannot be read, e.g. truncated or missing."""

    def __init__(self, step: int, path: str, error: Exception):
        # TensorStore appends its whole spec to the message, so only the first sentence is kept.
        lines = str(error).strip().splitlines()
        reason = lines[0].split(" See full TensorStore details")[0][:300] if lines else ""
        super().__init__(f"{type(error).__name__}: {reason}" if reason else type(error).__name__)
        self.step = step
        self.path = path


class ShapeMismatchError(CheckpointError):
    """A checkpoint whose parameters differ in path or shape from the run's model."""


class OptimizerChangeError(CheckpointError):
    """A checkpoint whose optimizer state was built by a different optimizer definition."""


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Map each leaf's path, written like `params/layer_0/mlp/up/kernel`, to its shape.

    Orbax metadata names a field of the TrainState or of an optimizer state by a
    dict key, and the live tree by an attribute. Both give the same path here.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(key) for key in path): tuple(leaf.shape) for path, leaf in leaves}


def shape_differences(
    saved: dict[str, tuple[int, ...]], current: dict[str, tuple[int, ...]]
) -> list[str]:
    """List every path whose shape differs or that only one side has, as readable lines."""
    lines = []
    for name in sorted(saved.keys() | current.keys()):
        if name not in current:
            lines.append(f"{name}: checkpoint {saved[name]}, not in this run")
        elif name not in saved:
            lines.append(f"{name}: not in the checkpoint, run {current[name]}")
        elif saved[name] != current[name]:
            lines.append(f"{name}: checkpoint {saved[name]}, run {current[name]}")
    return lines


def _is_optimizer_path(name: str) -> bool:
    return name.startswith("opt_state/") or name == "opt_state"


def _read_record(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    restored = manager.restore(step, args=ocp.args.Composite(**{DATA: ocp.args.JsonRestore()}))
    return dict(restored[DATA])


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(os.fspath(manager.directory), str(step))


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, int]:
    """Restore the state at `step` into `target` and return it with the data position.

    Raises the errors of `restore_checked`, which does the work.
    """
    state, batch_index, _ = restore_checked(manager, step, target)
    return state, batch_index


def restore_checked(
    manager: ocp.CheckpointManager,
    step: int,
    target: Any,
    *,
    optimizer_definition: dict[str, Any] | None = None,
    fresh_opt_state: Any = None,
) -> tuple[Any, int, bool]:
    """Restore the state at `step` into `target`; return it, the data position and a reset flag.

    The saved shapes are compared with `target` before any array is read.
    Raises ShapeMismatchError listing every parameter path that differs.
    The optimizer state counts as changed when it differs in structure or shape,
    or when the checkpoint records an optimizer definition other than
    `optimizer_definition`. A changed optimizer state is replaced by
    `fresh_opt_state` if that is given, and the returned flag is then True.
    Without `fresh_opt_state`, OptimizerChangeError is raised.
    Raises DamagedCheckpointError when a file of the checkpoint cannot be read.
    """
    path = _step_path(manager, step)
    # Orbax and TensorStore raise many exception types for a truncated or missing
    # file, so every error of reading a committed step counts as damage.
    try:
        record = _read_record(manager, step)
        metadata = manager.item_metadata(step)[STATE]
        if metadata is None:
            # Orbax 0.12.8 returns None instead of raising when state/_METADATA is missing.
            raise FileNotFoundError(f"{path}/{STATE}/_METADATA is missing or unreadable")
        saved = tree_shapes(metadata)
    except Exception as error:
        raise DamagedCheckpointError(step, path, error) from error

    current = tree_shapes(target)
    differences = shape_differences(saved, current)
    parameter_differences = [line for line in differences if not _is_optimizer_path(line)]
    if parameter_differences:
        raise ShapeMismatchError(
            f"The checkpoint {path} does not fit this run's model, so it cannot be restored. "
            f"Parameters that differ (checkpoint vs. run): {'; '.join(parameter_differences)}. "
            "Resume with the model config the checkpoint was written with, or use a new --workdir."
        )
    saved_definition = record.get("optimizer")
    changed_fields = sorted(
        name
        for name in (saved_definition or {}).keys() | (optimizer_definition or {}).keys()
        if saved_definition is not None
        and optimizer_definition is not None
        and saved_definition.get(name) != optimizer_definition.get(name)
    )
    # NOTE: tests cover a changed b1 or b2 with an unchanged state structure. A reset after
    # a change of the optimizer chain in code follows the same path but is untested.
    structure_changed = len(differences) > 0
    reset = bool(changed_fields) or structure_changed
    if reset and fresh_opt_state is None:
        if changed_fields:
            cause = "the optimizer definition changed: " + "; ".join(
                f"optimizer.{name}: {saved_definition.get(name)!r} -> "
                f"{optimizer_definition.get(name)!r}"
                for name in changed_fields
            )
        else:
            cause = (
                f"the optimizer state differs in structure ({len(differences)} paths, first "
                f"{differences[0]})"
            )
        raise OptimizerChangeError(
            f"The optimizer state in checkpoint {path} does not fit this run, because "
            f"{cause}. Pass --config.reset_optimizer=true to keep the parameters and the step "
            "and start the optimizer state afresh, or restore the optimizer settings the "
            "checkpoint was written with."
        )

    if reset:
        # Read the saved optimizer state with its own shapes, then drop it.
        saved_opt_state = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), metadata["opt_state"]
        )
        state_target = {
            "step": target.step,
            "params": target.params,
            "opt_state": saved_opt_state,
            "rng": target.rng,
        }
    else:
        state_target = target
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(state_target), DATA: ocp.args.JsonRestore()}
            ),
        )
    except Exception as error:
        raise DamagedCheckpointError(step, path, error) from error
    state = restored[STATE]
    if reset:
        state = target.replace(
            step=state["step"], params=state["params"], opt_state=fresh_opt_state, rng=state["rng"]
        )
    return state, int(restored[DATA]["batch_index"]), reset


def restore_newest_intact(
    manager: ocp.CheckpointManager,
    target: Any,
    *,
    fallback: bool,
    optimizer_definition: dict[str, Any] | None = None,
    fresh_opt_state: Any = None,
) -> tuple[Any, int, int, bool] | None:
    """Restore the newest checkpoint; return (state, batch index, step, reset) or None.

    A damaged newest checkpoint raises CheckpointError naming its directory,
    unless `fallback` is set. Then each damaged checkpoint is moved to
    `<checkpoints>_damaged/<step>` (nothing is deleted) and the next older one
    is tried. None means there is no checkpoint, or with `fallback` no intact one.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, batch_index, reset = restore_checked(
                manager,
                step,
                target,
                optimizer_definition=optimizer_definition,
                fresh_opt_state=fresh_opt_state,
            )
            return state, batch_index, step, reset
        except DamagedCheckpointError as damage:
            older = [s for s in manager.all_steps() if s < step]
            if not fallback:
                offer = (
                    f"resume from the newest older checkpoint (step {max(older)})"
                    if older
                    else "start from scratch, since no older checkpoint exists"
                )
                raise CheckpointError(
                    f"The newest checkpoint {damage.path} is damaged and cannot be restored "
                    f"({damage}). Nothing was deleted. Rerun with --config.restore_fallback=true "
                    f"to move it aside and {offer}, or replace {damage.path} with an intact copy."
                ) from damage
            set_aside = move_damaged(manager, step)
            writers.log_and_print(
                f"WARNING: The checkpoint at step {step} is damaged ({damage}); it was moved to "
                f"{set_aside} and an older checkpoint is tried."
            )
    return None


def move_damaged(manager: ocp.CheckpointManager, step: int) -> str:
    """Move the step directory `step` next to the checkpoints, out of Orbax's sight."""
    source = _step_path(manager, step)
    directory = os.fspath(manager.directory).rstrip("/") + "_damaged"
    destination = os.path.join(directory, str(step))
    # NOTE: only process 0 moves the directory. A multi-process run on a shared file
    # system is correct only if the other processes list the steps after the move.
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
        suffix = 1
        while os.path.exists(destination):
            destination = os.path.join(directory, f"{step}.{suffix}")
            suffix += 1
        os.rename(source, destination)
    manager.reload()
    return destination


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
