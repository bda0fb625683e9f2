"""Sharding tests: mesh checks on one device, and training on 8 fake CPU devices.

The 8-device tests need `--xla_force_host_platform_device_count=8` before JAX
starts. `test_eight_device_tests_pass` therefore reruns this file in a
subprocess with that flag, and the one-device suite skips them. Run them
directly with

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/sharding_test.py
"""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import ap as ap_config
from configs import ce as ce_config
from configs import dp as dp_config
from configs import pause_ce as pause_ce_config
from configs import va as va_config
from cyb_jax import checkpointing
from cyb_jax import configuration
from cyb_jax import model as model_lib
from cyb_jax import objective as objective_lib
from cyb_jax import sharding
from cyb_jax import train

CONFIGS = {
    "ce": ce_config,
    "pause_ce": pause_ce_config,
    "ap": ap_config,
    "va": va_config,
    "dp": dp_config,
}
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8)]
# Real tokens of the synthetic vocabulary; with W <= 2 the table pads to 64 rows.
VOCAB_SIZE = 61
STEPS = 3

eight_devices = pytest.mark.skipif(
    jax.device_count() != 8, reason="needs 8 devices; test_eight_device_tests_pass runs it"
)

# Logical names of every parameter, written out by hand so that the sharding
# check does not rely on the Flax code under test.
PARAMETER_AXES = {
    "embedding": ("vocab", "embed"),
    "query": ("embed", "heads", "kv"),
    "key": ("embed", "heads", "kv"),
    "value": ("embed", "heads", "kv"),
    "out": ("heads", "kv", "embed"),
    "gate": ("embed", "mlp"),
    "up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
    "head": ("embed", "vocab"),
    "attention_norm": ("embed",),
    "mlp_norm": ("embed",),
    "final_norm": ("embed",),
}


def _tiny_config(loss, mesh_degrees=(-1, 1, 1)):
    config = CONFIGS[loss].get_config()
    config.pause.window = 1 if loss == "ce" else 2
    config.data.seq_len = 8
    config.data.batch_size = 8
    config.model.num_layers = 1
    config.model.d_model = 32
    config.model.num_heads = 8
    config.model.mlp_dim = 64
    config.model.vocab_multiple = 16
    config.total_steps = 10
    config.optimizer.warmup_steps = 1
    if loss in ("va", "dp"):
        config.loss.prior = "1:3"
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_degrees
    return config


def _batches(config, count, seed=0):
    """Packed-looking synthetic batches: two segments per row and some padding."""
    rng = np.random.default_rng(seed)
    batch_size, length = config.data.batch_size, config.data.seq_len
    half = length // 2
    for _ in range(count):
        targets = rng.integers(3, VOCAB_SIZE, (batch_size, length), dtype=np.int32)
        segment_ids = np.where(np.arange(length) < half, 1, 2).astype(np.int32)
        segment_ids = np.broadcast_to(segment_ids, (batch_size, length)).copy()
        segment_ids[0, -2:] = 0
        targets[segment_ids == 0] = 0
        positions = np.where(np.arange(length) < half, np.arange(length), np.arange(length) - half)
        positions = np.broadcast_to(positions.astype(np.int32), (batch_size, length))
        inputs = np.zeros_like(targets)
        inputs[:, 1:] = targets[:, :-1]
        inputs[:, half] = 0
        yield {
            "inputs": inputs,
            "targets": targets,
            "weights": (segment_ids > 0).astype(np.float32),
            "segment_ids": segment_ids,
            "positions": positions,
        }


class _Trainer:
    """The sharded state and the jitted train step, built as train_and_evaluate builds them."""

    def __init__(self, config, devices, initial_state=None):
        self.mesh = sharding.make_mesh(config.mesh, devices)
        self.rules = sharding.logical_rules(config.mesh)
        model_config = model_lib.from_config(config, VOCAB_SIZE)
        configuration.validate_for_mesh(config, len(devices), model_config)
        model = model_lib.Transformer(model_config)
        optimizer, _ = train.make_optimizer(config.optimizer, config.total_steps)
        if initial_state is None:
            self.state, self.shardings = train.init_state(
                config, model, model_config, optimizer, self.mesh, self.rules
            )
        else:
            # Placing a given state skips compiling the init, which dominates these tests.
            self.shardings = _state_shardings(config, model, optimizer, self.mesh, self.rules)
            self.state = jax.device_put(initial_state, self.shardings)
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        objective = objective_lib.make_objective(config, model_config)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            self._step = jax.jit(
                functools.partial(
                    train.train_step, model=model, optimizer=optimizer, objective=objective
                ),
                in_shardings=(self.shardings, self.batch_sharding),
                out_shardings=(self.shardings, sharding.replicated(self.mesh)),
                donate_argnums=(0,),
            )

    def step(self, batch) -> float:
        batch = {key: jax.device_put(value, self.batch_sharding) for key, value in batch.items()}
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            self.state, metrics = self._step(self.state, batch)
        return float(metrics["loss"])


def _state_shardings(config, model, optimizer, mesh, rules):
    """The rule-derived shardings of the train state, from shapes alone."""
    length = config.data.seq_len

    def init_fn(rng):
        tokens = jnp.zeros((1, length), jnp.int32)
        positions = jnp.arange(length, dtype=jnp.int32)[None, :]
        params = model.init(rng, tokens, positions, jnp.ones_like(tokens))["params"]
        return train.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(jax.random.key(0)),
        )

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init_fn, jax.random.key(0))
        return sharding.logical_shardings(abstract, mesh, rules)


@functools.cache
def _one_device_run(loss):
    """Return the initial state, the losses and the final parameters of the 1-device run."""
    trainer = _Trainer(_tiny_config(loss), jax.devices()[:1])
    initial_state = jax.device_get(trainer.state)
    losses = [trainer.step(batch) for batch in _batches(_tiny_config(loss), STEPS)]
    return initial_state, losses, jax.device_get(trainer.state.params)


def _expected_spec(names, config):
    rules = dict(sharding.logical_rules(config.mesh))
    return PartitionSpec(*(rules.get(name) for name in names))


def _parameter_axes(path):
    keys = [entry.key for entry in path]
    return PARAMETER_AXES[keys[-1] if keys[-1] != "kernel" and keys[-1] != "scale" else keys[-2]]


# ---------------------------------------------------------------- one device


def test_eight_device_tests_pass():
    if jax.device_count() == 8:
        pytest.skip("already running on 8 devices")
    environment = dict(os.environ)
    environment["XLA_FLAGS"] = (
        environment.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_mesh_degrees_must_match_devices():
    config = _tiny_config("ce", (2, 2, 1))
    model_config = model_lib.from_config(config, VOCAB_SIZE)
    with pytest.raises(configuration.ConfigError) as error:
        configuration.validate_for_mesh(config, 8, model_config)
    assert "needs 4 devices but 8 are available" in str(error.value)


def test_heads_must_divide_tensor_axis():
    config = _tiny_config("ce", (1, 1, 8))
    config.model.num_heads = 4
    model_config = model_lib.from_config(config, VOCAB_SIZE)
    with pytest.raises(configuration.ConfigError) as error:
        configuration.validate_for_mesh(config, 8, model_config)
    message = str(error.value)
    assert "config.model.num_heads = 4" in message
    assert "mesh axis tensor" in message
    assert "use a multiple of 8" in message


def test_padded_vocab_must_divide_tensor_axis():
    config = _tiny_config("ap", (1, 1, 8))
    config.model.vocab_multiple = 4
    config.model.mlp_dim = 64
    model_config = model_lib.from_config(config, VOCAB_SIZE)
    assert model_config.padded_vocab_size == 64
    config.model.vocab_multiple = 6
    model_config = model_lib.from_config(config, VOCAB_SIZE)
    with pytest.raises(configuration.ConfigError) as error:
        configuration.validate_for_mesh(config, 8, model_config)
    message = str(error.value)
    assert "config.model.vocab_multiple = 66" in message
    assert "'vocab'" in message
    assert "set config.model.vocab_multiple to a multiple of 8" in message


def test_mlp_must_divide_tensor_axis():
    config = _tiny_config("ce", (1, 2, 4))
    config.model.mlp_dim = 66
    model_config = model_lib.from_config(config, VOCAB_SIZE)
    with pytest.raises(configuration.ConfigError, match=r"config.model.mlp_dim = 66 .* 4 devices"):
        configuration.validate_for_mesh(config, 8, model_config)


def test_batch_must_divide_data_axes():
    config = _tiny_config("ce", (4, 2, 1))
    config.data.batch_size = 12
    model_config = model_lib.from_config(config, VOCAB_SIZE)
    with pytest.raises(configuration.ConfigError) as error:
        configuration.validate_for_mesh(config, 8, model_config)
    assert "config.data.batch_size = 12" in str(error.value)
    assert "data x fsdp" in str(error.value)


def test_batch_must_divide_processes():
    config = _tiny_config("ce", (-1, 1, 1))
    config.data.batch_size = 6
    model_config = model_lib.from_config(config, VOCAB_SIZE)
    with pytest.raises(configuration.ConfigError, match="does not divide the 4 processes"):
        configuration.validate_for_mesh(config, 2, model_config, process_count=4)


def test_rule_with_unknown_mesh_axis_fails():
    config = _tiny_config("ce")
    config.mesh.rules = (("vocab", "model"),)
    model_config = model_lib.from_config(config, VOCAB_SIZE)
    with pytest.raises(configuration.ConfigError, match="unknown mesh axis 'model'"):
        configuration.validate_for_mesh(config, 1, model_config)


def test_valid_mesh_returns_resolved_shape():
    config = _tiny_config("ap", (2, -1, 2))
    model_config = model_lib.from_config(config, VOCAB_SIZE)
    shape = configuration.validate_for_mesh(config, 8, model_config)
    assert shape == {"data": 2, "fsdp": 2, "tensor": 2}


def test_parameter_report_counts_replicated_bytes():
    trainer = _Trainer(_tiny_config("ce"), jax.devices()[:1])
    report = sharding.check_parameter_sharding(trainer.state.params, trainer.shardings.params)
    leaves = jax.tree.leaves(trainer.state.params)
    assert report.count == sum(leaf.size for leaf in leaves)
    assert report.bytes == 4 * report.count
    # One device: every parameter is a full copy.
    assert report.replicated_bytes == report.bytes


# -------------------------------------------------------------- 8 devices


@eight_devices
@pytest.mark.parametrize("mesh_degrees", MESHES, ids=lambda m: "x".join(map(str, m)))
@pytest.mark.parametrize("loss", list(CONFIGS))
def test_steps_match_one_device(loss, mesh_degrees):
    config = _tiny_config(loss, mesh_degrees)
    initial_state, expected_losses, expected_params = _one_device_run(loss)
    trainer = _Trainer(config, jax.devices(), initial_state)
    losses = [trainer.step(batch) for batch in _batches(config, STEPS)]
    np.testing.assert_allclose(losses, expected_losses, rtol=2e-5)
    params = jax.device_get(trainer.state.params)
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        expected = expected_params
        for entry in path:
            expected = expected[entry.key]
        np.testing.assert_allclose(
            value, expected, rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path)
        )


@eight_devices
@pytest.mark.parametrize("mesh_degrees", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_parameters_carry_rule_shardings(mesh_degrees):
    config = _tiny_config("ap", mesh_degrees)
    trainer = _Trainer(config, jax.devices())
    mesh = trainer.mesh
    for path, value in jax.tree_util.tree_flatten_with_path(trainer.state.params)[0]:
        name = jax.tree_util.keystr(path)
        spec = _expected_spec(_parameter_axes(path), config)
        assert value.sharding.is_equivalent_to(NamedSharding(mesh, spec), value.ndim), (
            f"{name}: {value.sharding.spec} != {spec}"
        )
        shard_shape = list(value.shape)
        for dimension, axis in enumerate(spec):
            if axis is not None:
                axes = (axis,) if isinstance(axis, str) else axis
                shard_shape[dimension] //= int(np.prod([mesh.shape[a] for a in axes]))
        assert value.addressable_shards[0].data.shape == tuple(shard_shape), name


@eight_devices
def test_embedding_sharding_on_mixed_mesh():
    trainer = _Trainer(_tiny_config("ap", (1, 4, 2)), jax.devices())
    embedding = trainer.state.params["embedding"]
    assert embedding.shape == (64, 32)
    # vocab over tensor (2), embed over fsdp (4).
    assert embedding.addressable_shards[0].data.shape == (32, 8)


@eight_devices
def test_replicated_large_weight_fails():
    trainer = _Trainer(_tiny_config("ap", (1, 1, 8)), jax.devices())
    params = dict(trainer.state.params)
    params["embedding"] = jax.device_put(params["embedding"], sharding.replicated(trainer.mesh))
    with pytest.raises(ValueError, match=r"\['embedding'\] \(64, 32\)"):
        sharding.check_parameter_sharding(params, trainer.shardings.params, min_bytes=1024)
    # Parameters the rules replicate (norm scales, embed -> fsdp of size 1) are not errors.
    report = sharding.check_parameter_sharding(
        trainer.state.params, trainer.shardings.params, min_bytes=0
    )
    assert 0 < report.replicated_bytes < report.bytes


@eight_devices
def test_checkpoint_restores_on_other_meshes(tmp_path):
    batches = list(_batches(_tiny_config("ap"), 2, seed=1))
    source = _Trainer(_tiny_config("ap", (2, 2, 2)), jax.devices())
    source.step(batches[0])
    manager = checkpointing.make_manager(str(tmp_path / "checkpoints"), keep=1, async_save=False)
    checkpointing.save(manager, 1, source.state, batch_index=1)
    manager.wait_until_finished()
    next_loss = source.step(batches[1])

    for mesh_degrees, devices in [((1, 4, 2), jax.devices()), ((1, 1, 1), jax.devices()[:1])]:
        fresh = _Trainer(_tiny_config("ap", mesh_degrees), devices)
        target = checkpointing.abstract_target(fresh.state, fresh.shardings)
        restored, batch_index = checkpointing.restore(manager, 1, target)
        assert batch_index == 1
        assert int(restored.step) == 1
        restored_leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
        for (path, value), expected in zip(restored_leaves, jax.tree.leaves(fresh.shardings)):
            assert value.sharding.is_equivalent_to(expected, value.ndim), (
                f"{mesh_degrees} {jax.tree_util.keystr(path)}: {value.sharding} != {expected}"
            )
        fresh.state = restored
        np.testing.assert_allclose(fresh.step(batches[1]), next_loss, rtol=2e-5)
    manager.close()
