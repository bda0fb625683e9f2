"""Tests of the chunked output head against the full logits it replaces in training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ap as ap_config
from configs import ce as ce_config
from configs import dp as dp_config
from configs import pause_ce as pause_ce_config
from configs import va as va_config
from cyb_jax import head
from cyb_jax import losses
from cyb_jax import model as model_lib
from cyb_jax import objective as objective_lib
from cyb_jax import sharding

CONFIGS = {
    "ce": ce_config,
    "pause_ce": pause_ce_config,
    "ap": ap_config,
    "va": va_config,
    "dp": dp_config,
}
BATCH = 2
LENGTH = 16
WINDOW = 2
# V + W = 302 rows pad to 384, so the head has pause-code and padding columns to drop.
VOCAB = 300
SLOTS = LENGTH * WINDOW
# 7 does not divide the 32 slots of a row, so the last chunk is padded.
CHUNKS = (7, 8, 64)


def _model_config(head_chunk: int) -> model_lib.TransformerConfig:
    return model_lib.TransformerConfig(
        vocab_size=VOCAB,
        window=WINDOW,
        num_layers=1,
        d_model=32,
        num_heads=2,
        mlp_dim=64,
        dk_prior=0.9,
        head_chunk=head_chunk,
    )


def _run_config(loss_name: str):
    config = CONFIGS[loss_name].get_config()
    config.pause.window = WINDOW
    if config.loss.prior:
        config.loss.prior = "1:3"
    return config


def _packed_batch() -> dict[str, jax.Array]:
    """Return a batch whose row 0 packs two examples and whose row 1 ends in padding."""
    rng = np.random.default_rng(0)
    targets = rng.integers(1, VOCAB, size=(BATCH, LENGTH))
    segment_ids = np.ones((BATCH, LENGTH), np.int32)
    segment_ids[0, 9:] = 2
    segment_ids[1, 11:] = 0
    positions = np.tile(np.arange(LENGTH), (BATCH, 1))
    positions[0, 9:] -= 9
    targets[1, 11:] = 0
    inputs = np.zeros_like(targets)
    inputs[:, 1:] = targets[:, :-1]
    inputs[0, 9] = 0
    return {
        "inputs": jnp.asarray(inputs, jnp.int32),
        "targets": jnp.asarray(targets, jnp.int32),
        "weights": jnp.asarray(segment_ids > 0, jnp.float32),
        "segment_ids": jnp.asarray(segment_ids),
        "positions": jnp.asarray(positions, jnp.int32),
    }


@pytest.fixture(scope="module")
def params():
    batch = _packed_batch()
    variables = model_lib.Transformer(_model_config(0)).init(
        jax.random.key(3), batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    return nn.meta.unbox(variables["params"])


def _logits_loss(params, loss_name):
    """Compute the loss from the full logits, as decoding and analysis see them."""
    batch = _packed_batch()
    model_config = _model_config(0)
    logits = model_lib.Transformer(model_config).apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    objective = objective_lib.make_objective(_run_config(loss_name), model_config)
    loss, _ = objective(logits, batch["targets"], batch["weights"], jnp.asarray(1000))
    return loss


def _head_loss(params, loss_name, head_chunk):
    """Compute the loss from the log-probabilities the model returns, as train_step does."""
    batch = _packed_batch()
    model_config = _model_config(head_chunk)
    log_probs = model_lib.Transformer(model_config).apply(
        {"params": params},
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        targets_BxL=batch["targets"],
    )
    objective = objective_lib.make_objective(_run_config(loss_name), model_config)
    loss, _ = objective(log_probs, batch["targets"], batch["weights"], jnp.asarray(1000))
    return loss


def _assert_trees_close(actual, expected, rtol, atol):
    paths_actual = jax.tree_util.tree_flatten_with_path(actual)[0]
    paths_expected = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [path for path, _ in paths_actual] == [path for path, _ in paths_expected]
    for (path, value), (_, reference) in zip(paths_actual, paths_expected):
        np.testing.assert_allclose(
            value, reference, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize("loss_name", sorted(CONFIGS))
def test_chunked_head_matches_logits(params, loss_name):
    expected_loss, expected_grads = jax.value_and_grad(_logits_loss)(params, loss_name)
    grad_scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(expected_grads))
    for head_chunk in (0, *CHUNKS):
        loss, grads = jax.value_and_grad(_head_loss)(params, loss_name, head_chunk)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, err_msg=f"chunk {head_chunk}")
        _assert_trees_close(grads, expected_grads, rtol=1e-4, atol=1e-5 * grad_scale)


def test_chunked_head_under_sharding_rules(params):
    config = _run_config("ap")
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    rules = sharding.logical_rules(config.mesh)
    expected_loss, expected_grads = jax.value_and_grad(_logits_loss)(params, "ap")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        loss, grads = jax.jit(jax.value_and_grad(_head_loss), static_argnums=(1, 2))(
            params, "ap", 7
        )
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    grad_scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(expected_grads))
    _assert_trees_close(grads, expected_grads, rtol=1e-4, atol=1e-5 * grad_scale)


def test_head_log_probs_match_step_log_probs(params):
    """The model's log-probabilities equal step_log_probs of its logits, DK offset included."""
    batch = _packed_batch()
    apply = model_lib.Transformer(_model_config(5)).apply
    logits = apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    expected = losses.step_log_probs(logits, batch["targets"], VOCAB)
    log_probs = apply(
        {"params": params},
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        targets_BxL=batch["targets"],
    )
    assert isinstance(log_probs, losses.StepLogProbs)
    for name in losses.StepLogProbs._fields:
        actual = getattr(log_probs, name)
        assert actual.shape == (BATCH, LENGTH, WINDOW)
        assert actual.dtype == jnp.float32
        np.testing.assert_allclose(actual, getattr(expected, name), rtol=1e-5, atol=1e-5)


def test_head_padding_targets_match_unchunked():
    """Padding ids of -1 give the same finite values chunked and unchunked."""
    rng = np.random.default_rng(1)
    x_BxSxD = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
    kernel_DxV1 = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    logits_fn = lambda x: jnp.tensordot(x, kernel_DxV1, axes=1)  # noqa: E731
    targets = jnp.asarray([[1, 2, 3, -1, -1, -1], [0, 1, 2, 3, 0, -1]])
    chunked = head.chunked_step_log_probs(logits_fn, x_BxSxD, targets, 4, chunk_slots=4)
    unchunked = head.step_log_probs_of_slots(logits_fn, x_BxSxD, targets, 4)
    for name in losses.StepLogProbs._fields:
        values = getattr(chunked, name)
        assert np.all(np.isfinite(values)), name
        np.testing.assert_allclose(values, getattr(unchunked, name), rtol=1e-6, err_msg=name)


def test_chunked_head_rejects_nonpositive_chunk():
    x_BxSxD = jnp.zeros((1, 4, 2))
    with pytest.raises(ValueError, match="chunk_slots must be a positive"):
        head.chunked_step_log_probs(lambda x: x, x_BxSxD, jnp.zeros((1, 4), jnp.int32), 1, 0)


def test_model_rejects_negative_head_chunk(params):
    batch = _packed_batch()
    with pytest.raises(ValueError, match="head_chunk must be 0 or a positive"):
        model_lib.Transformer(_model_config(-1)).apply(
            {"params": params},
            batch["inputs"],
            batch["positions"],
            batch["segment_ids"],
            targets_BxL=batch["targets"],
        )


# Memory: the jaxpr of the chunked loss and gradient has no array as large as the logits.


def _sub_jaxprs(value):
    """Yield the jaxprs nested in an equation parameter (scan, remat, pjit, cond branches)."""
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _float32_sizes(jaxpr) -> list[int]:
    """Element counts of every float32 value that the jaxpr or a nested jaxpr defines."""
    sizes = []
    for var in (*jaxpr.invars, *jaxpr.constvars):
        if var.aval.dtype == jnp.float32:
            sizes.append(var.aval.size)
    for equation in jaxpr.eqns:
        for var in equation.outvars:
            aval = var.aval
            if hasattr(aval, "dtype") and aval.dtype == jnp.float32:
                sizes.append(aval.size)
        for param in equation.params.values():
            for inner in _sub_jaxprs(param):
                sizes.extend(_float32_sizes(inner))
    return sizes


def _largest_float32_size(loss_fn, params) -> int:
    closed = jax.make_jaxpr(jax.value_and_grad(loss_fn))(params)
    return max(_float32_sizes(closed.jaxpr))


def test_chunked_train_loss_never_forms_all_logits(params):
    all_logits_size = BATCH * SLOTS * (VOCAB + 1)
    # The embedding and head tables (384 x 32) are the largest other float32 arrays.
    assert 384 * 32 < all_logits_size
    naive = _largest_float32_size(lambda p: _head_loss(p, "ap", 0), params)
    assert naive >= all_logits_size, "the check must see the full logits of the naive head"
    chunked = _largest_float32_size(lambda p: _head_loss(p, "ap", 8), params)
    assert chunked < all_logits_size


def test_config_head_chunk_reaches_model():
    config = ap_config.get_config()
    config.model.head_chunk = 96
    assert model_lib.from_config(config, VOCAB).head_chunk == 96
