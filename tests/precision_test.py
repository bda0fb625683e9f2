"""Tests of bfloat16 activations with float32 parameters against the float32 model."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import ap as ap_config
from cyb_jax import losses
from cyb_jax import model as model_lib
from cyb_jax import objective as objective_lib

BATCH = 4
LENGTH = 32
WINDOW = 2
VOCAB = 60
TRAIN_STEPS = 40
# Measured relative loss differences bfloat16 vs float32 after TRAIN_STEPS steps, with
# jax 0.10.2 on CPU: 3.4e-4 ('visible') and 5e-6 ('private'). bfloat16 keeps 8
# significant bits, so each activation is rounded by up to 2^-9 (0.2%), and the
# float32 norms, softmax, log-sum-exp and loss keep that rounding from growing. The
# bound is 2^-9, about 6x the larger measurement.
MAX_RELATIVE_LOSS_DIFFERENCE = 2.0**-9


def _model_config(dtype: str, visibility: str) -> model_lib.TransformerConfig:
    return model_lib.TransformerConfig(
        vocab_size=VOCAB,
        window=WINDOW,
        num_layers=2,
        d_model=64,
        num_heads=4,
        mlp_dim=128,
        dtype=dtype,
        param_dtype="float32",
        pause_visibility=visibility,
        dk_prior=0.9,
        vocab_multiple=64,
        head_chunk=16,
    )


def _run_config():
    config = ap_config.get_config()
    config.pause.window = WINDOW
    return config


def _batch() -> dict[str, jax.Array]:
    """Return rows of a repeating pattern with noise, which a small model learns quickly."""
    rng = np.random.default_rng(0)
    pattern = np.arange(LENGTH) % 12 + 1
    targets = np.where(
        rng.random((BATCH, LENGTH)) < 0.2, rng.integers(1, VOCAB, (BATCH, LENGTH)), pattern
    )
    inputs = np.concatenate([np.zeros((BATCH, 1), np.int64), targets[:, :-1]], axis=1)
    return {
        "inputs": jnp.asarray(inputs, jnp.int32),
        "targets": jnp.asarray(targets, jnp.int32),
        "weights": jnp.ones((BATCH, LENGTH), jnp.float32),
        "segment_ids": jnp.ones((BATCH, LENGTH), jnp.int32),
        "positions": jnp.asarray(np.tile(np.arange(LENGTH), (BATCH, 1)), jnp.int32),
    }


def _loss(params, model_config):
    batch = _batch()
    log_probs = model_lib.Transformer(model_config).apply(
        {"params": params},
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        targets_BxL=batch["targets"],
    )
    objective = objective_lib.make_objective(_run_config(), model_config)
    loss, _ = objective(log_probs, batch["targets"], batch["weights"], jnp.asarray(1000))
    return loss


@functools.cache
def _trained_params(visibility: str):
    """Return float32 parameters after TRAIN_STEPS float32 Adam steps on `_batch()`."""
    model_config = _model_config("float32", visibility)
    batch = _batch()
    params = model_lib.Transformer(model_config).init(
        jax.random.key(0), batch["inputs"], batch["positions"], batch["segment_ids"]
    )["params"]
    params = nn.meta.unbox(params)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(_loss)(params, model_config)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(TRAIN_STEPS):
        params, opt_state = step(params, opt_state)
    return params


@pytest.mark.parametrize("visibility", ["visible", "private"])
def test_bfloat16_loss_close_to_float32(visibility):
    params = _trained_params(visibility)
    loss_32 = float(_loss(params, _model_config("float32", visibility)))
    loss_16 = float(_loss(params, _model_config("bfloat16", visibility)))
    assert loss_32 < 0.5 * np.log(VOCAB), "the trained model must be far from uniform"
    relative = abs(loss_16 - loss_32) / loss_32
    assert relative < MAX_RELATIVE_LOSS_DIFFERENCE, (loss_16, loss_32)


def _dot_dtypes(jaxpr) -> set:
    """Input dtypes of every dot_general in the jaxpr and the jaxprs nested in it."""
    dtypes = set()
    for equation in jaxpr.eqns:
        if equation.primitive.name == "dot_general":
            dtypes.update(var.aval.dtype for var in equation.invars)
        for param in equation.params.values():
            inner = param.jaxpr if isinstance(param, jax.extend.core.ClosedJaxpr) else param
            if isinstance(inner, jax.extend.core.Jaxpr):
                dtypes |= _dot_dtypes(inner)
    return dtypes


def test_bfloat16_model_multiplies_in_bfloat16():
    params = _trained_params("private")
    closed = jax.make_jaxpr(_loss, static_argnums=1)(params, _model_config("bfloat16", "private"))
    assert jnp.dtype(jnp.bfloat16) in _dot_dtypes(closed.jaxpr)


def test_bfloat16_keeps_float32_params_and_grads():
    params = _trained_params("private")
    model_config = _model_config("bfloat16", "private")
    loss, grads = jax.value_and_grad(_loss)(params, model_config)
    assert loss.dtype == jnp.float32
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert grad.dtype == jnp.float32, jax.tree_util.keystr(path)
        assert np.all(np.isfinite(grad)), jax.tree_util.keystr(path)
    updated = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
    for path, param in jax.tree_util.tree_flatten_with_path(updated)[0]:
        assert param.dtype == jnp.float32, jax.tree_util.keystr(path)


def test_bfloat16_log_probs_are_float32():
    params = _trained_params("private")
    batch = _batch()
    log_probs = model_lib.Transformer(_model_config("bfloat16", "private")).apply(
        {"params": params},
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        targets_BxL=batch["targets"],
    )
    for name in losses.StepLogProbs._fields:
        assert getattr(log_probs, name).dtype == jnp.float32, name


def test_bfloat16_grads_point_like_float32():
    params = _trained_params("private")
    grads_32 = jax.grad(_loss)(params, _model_config("float32", "private"))
    grads_16 = jax.grad(_loss)(params, _model_config("bfloat16", "private"))
    flat_32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads_32)])
    flat_16 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads_16)])
    cosine = jnp.dot(flat_32, flat_16) / (jnp.linalg.norm(flat_32) * jnp.linalg.norm(flat_16))
    assert cosine > 0.99, float(cosine)
