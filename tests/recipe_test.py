"""Tests of pause recipe 'sampled': grants drawn from omega, absent slots, equivalence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from cyb_jax import losses
from cyb_jax import model
from cyb_jax import objective

VOCAB = 30
WINDOW = 3
LENGTH = 5


def _config(recipe, world_stop="", step_ce_weight=1.0):
    config = base.get_config()
    config.pause.window = WINDOW
    config.pause.recipe = recipe
    config.loss.name = "ap"
    config.loss.world_stop = world_stop
    config.loss.step_ce_weight = step_ce_weight
    return config


def _model_config():
    return model.TransformerConfig(
        vocab_size=VOCAB, window=WINDOW, num_layers=2, d_model=16, num_heads=2, mlp_dim=24,
        vocab_multiple=64, dk_prior=0.6,
    )


def _batch():
    rng = np.random.default_rng(1)
    targets = jnp.asarray(rng.integers(3, VOCAB, size=(2, LENGTH)), jnp.int32)
    inputs = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), targets[:, :-1]], axis=1)
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (2, LENGTH))
    segments = jnp.ones((2, LENGTH), jnp.int32)
    return inputs, targets, positions, segments


@pytest.fixture(scope="module")
def params():
    inputs, _, positions, segments = _batch()
    variables = model.Transformer(_model_config()).init(jax.random.key(2), inputs, positions, segments)
    return nn.meta.unbox(variables["params"])


def _loss(params, config, granted, slots=None):
    """Return the objective's loss; `slots` perturbs the input vector of every slot."""
    inputs, targets, positions, segments = _batch()
    variables = {"params": params}
    if slots is not None:
        variables["perturbations"] = {"slots": slots}
    logits = model.Transformer(_model_config()).apply(variables, inputs, positions, segments, granted)
    fn = objective.make_objective(config, _model_config())
    loss, _ = fn(logits, targets, jnp.ones((2, LENGTH)), jnp.asarray(1000), granted)
    return loss


def test_fixed_recipe_has_no_sampler():
    assert objective.make_grant_sampler(_config("fixed")) is None


def test_unknown_recipe_is_rejected():
    with pytest.raises(ValueError, match="pause.recipe"):
        objective.make_grant_sampler(_config("random"))


def test_grants_follow_world_stop():
    sample = objective.make_grant_sampler(_config("sampled", world_stop="1:0:3"))
    granted = np.asarray(sample(jax.random.key(0), (200, 50)))
    assert set(np.unique(granted)) == {1, 3}
    assert np.mean(granted == 3) == pytest.approx(0.75, abs=0.02)
    last_only = objective.make_grant_sampler(_config("sampled"))
    assert np.all(np.asarray(last_only(jax.random.key(0), (4, 6))) == WINDOW)


def test_sampled_equals_fixed_with_last_step_world(params):
    sample = objective.make_grant_sampler(_config("sampled"))
    granted = sample(jax.random.key(5), (2, LENGTH))
    sampled_loss, sampled_grads = jax.value_and_grad(_loss)(params, _config("sampled"), granted)
    fixed_loss, fixed_grads = jax.value_and_grad(_loss)(params, _config("fixed"), None)
    np.testing.assert_allclose(sampled_loss, fixed_loss, rtol=1e-6)
    for sampled, fixed in zip(jax.tree.leaves(sampled_grads), jax.tree.leaves(fixed_grads)):
        np.testing.assert_allclose(sampled, fixed, rtol=1e-5, atol=1e-7)


def test_absent_slots_influence_nothing(params):
    config = _config("sampled", world_stop="1:1:1")
    granted = jnp.asarray([[1, 3, 2, 1, 2], [3, 1, 1, 2, 3]], jnp.int32)
    present_BxS = np.arange(WINDOW)[None, None, :] < np.asarray(granted)[..., None]
    present_BxS = present_BxS.reshape(2, LENGTH * WINDOW)
    zeros = jnp.zeros((2, LENGTH * WINDOW, 16))
    slot_grads = np.asarray(jax.grad(lambda slots: _loss(params, config, granted, slots))(zeros))
    magnitude_BxS = np.abs(slot_grads).sum(-1)
    assert np.all(np.isfinite(slot_grads))
    assert np.all(magnitude_BxS[~present_BxS] == 0.0)
    assert np.all(magnitude_BxS[present_BxS] > 0.0)
    # Changing what the absent slots read leaves the loss and the parameter gradients unchanged.
    noise = jax.random.normal(jax.random.key(7), zeros.shape) * (~present_BxS)[..., None]
    base_loss, base_grads = jax.value_and_grad(_loss)(params, config, granted, zeros)
    noisy_loss, noisy_grads = jax.value_and_grad(_loss)(params, config, granted, noise)
    assert float(noisy_loss) == float(base_loss)
    for noisy, clean in zip(jax.tree.leaves(noisy_grads), jax.tree.leaves(base_grads)):
        assert np.all(np.isfinite(noisy))
        np.testing.assert_allclose(noisy, clean, rtol=1e-6, atol=1e-8)


def test_one_granted_step_reads_step_zero(params):
    config = _config("sampled", world_stop="1:1:1", step_ce_weight=0.0)
    granted = jnp.ones((2, LENGTH), jnp.int32)
    inputs, targets, positions, segments = _batch()
    logits = model.Transformer(_model_config()).apply(
        {"params": params}, inputs, positions, segments, granted
    )
    log_probs = losses.step_log_probs(logits, targets, VOCAB)
    expected = jnp.mean(-log_probs.target[..., 0])
    np.testing.assert_allclose(_loss(params, config, granted), expected, rtol=1e-6)
