"""The tiny model and checkpoint reader that the training-loop tests share."""

import os

import ml_collections
import orbax.checkpoint as ocp


def configure(
    config: ml_collections.ConfigDict, data_dir: str, **overrides
) -> ml_collections.ConfigDict:
    """Shrink an experiment config to a one-layer, 32-wide model on 4 x 32 tokens, logged every step.

    `overrides` maps dotted field names ('optimizer.warmup_steps') to values.
    """
    config.data.data_dir = data_dir
    config.data.seq_len = 32
    config.data.batch_size = 4
    config.model.num_layers = 1
    config.model.d_model = 32
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.log_every = 1
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def final_params(workdir: str):
    """Return the newest checkpoint's step and parameters in a workdir."""
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_names=("state", "data")
    ) as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored["state"]["params"]
