"""Tests of the training objective and the per-token statistics against direct formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import ap as ap_config
from configs import pause_ce as pause_ce_config
from cyb_jax import losses
from cyb_jax import model
from cyb_jax import objective


def _log_probs(rng, shape=(3, 5), window=3):
    target = np.log(rng.uniform(0.01, 1.0, size=shape + (window,)))
    dont_know = rng.uniform(0.05, 0.95, size=shape + (window,))
    return losses.StepLogProbs(
        target=jnp.asarray(target), dont_know=jnp.log(dont_know), answer=jnp.log1p(-dont_know)
    ), np.exp(target), dont_know


def test_cyb_statistics_match_direct_formulas():
    lp, t, d = _log_probs(np.random.default_rng(0))
    stats = objective.token_statistics(lp, "ap")
    d_last0 = d.copy()
    d_last0[..., -1] = 0.0
    survival = np.concatenate([np.ones(d.shape[:-1] + (1,)), np.cumprod(d_last0, -1)[..., :-1]], -1)
    halting = (1.0 - d_last0) * survival
    np.testing.assert_allclose(stats["nll"], -np.log((halting * t).sum(-1)), rtol=1e-5)
    np.testing.assert_allclose(stats["pauses"], (halting * np.arange(3)).sum(-1), rtol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(stats[f"nll_step_{i}"], -np.log(t[..., i]), rtol=1e-5)
    for i in range(2):
        np.testing.assert_allclose(stats[f"dk_step_{i}"], d[..., i], rtol=1e-5)
    answered = np.where(d[..., 0] <= 0.5, 0, np.where(d[..., 1] <= 0.5, 1, 2))
    np.testing.assert_array_equal(stats["self_paced_pauses"], answered)
    chosen = np.take_along_axis(t, answered[..., None], -1)[..., 0]
    np.testing.assert_allclose(stats["self_paced_nll"], -np.log(chosen), rtol=1e-5)


def test_baseline_statistics_read_fixed_steps():
    lp, t, _ = _log_probs(np.random.default_rng(1))
    ce = objective.token_statistics(lp, "ce")
    np.testing.assert_allclose(ce["nll"], -np.log(t[..., 0]), rtol=1e-5)
    assert np.all(np.asarray(ce["pauses"]) == 0)
    pause_ce = objective.token_statistics(lp, "pause_ce")
    np.testing.assert_allclose(pause_ce["nll"], -np.log(t[..., -1]), rtol=1e-5)
    assert np.all(np.asarray(pause_ce["pauses"]) == 2)


def _objective(config, window=3, vocab=7):
    model_config = model.TransformerConfig(vocab_size=vocab, window=window, dk_prior=0.9)
    return objective.make_objective(config, model_config)


def _batch(window=3, vocab=7):
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 4, window, vocab + 1)) * 3)
    targets = jnp.asarray(rng.integers(0, vocab, size=(2, 4)))
    weights = jnp.asarray([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    return logits, targets, weights


def _config(base, **loss_fields):
    config = base.get_config()
    config.pause.window = 3
    for key, value in loss_fields.items():
        config.loss[key] = value
    return config


def test_step_ce_weight_adds_mean_step_nll():
    logits, targets, weights = _batch()
    plain, _ = _objective(_config(ap_config, step_ce_weight=0.0))(logits, targets, weights, 0)
    boosted, _ = _objective(_config(ap_config, step_ce_weight=0.5))(logits, targets, weights, 0)
    lp = losses.step_log_probs(logits, targets, 7)
    mean_step_nll = np.asarray(jnp.mean(-lp.target, -1))
    w = np.asarray(weights)
    expected_extra = 0.5 * (mean_step_nll * w).sum() / w.sum()
    np.testing.assert_allclose(float(boosted - plain), expected_extra, rtol=1e-5)


def test_dk_warmup_holds_d_at_prior():
    logits, targets, weights = _batch()
    config = _config(ap_config, step_ce_weight=0.0, dk_warmup_steps=10)
    warm = _objective(config)
    during, _ = warm(logits, targets, weights, 3)
    after, _ = warm(logits, targets, weights, 10)
    lp = losses.step_log_probs(logits, targets, 7)
    held = losses.StepLogProbs(
        target=lp.target,
        dont_know=jnp.full_like(lp.dont_know, np.log(0.9)),
        answer=jnp.full_like(lp.answer, np.log(0.1)),
    )
    w = np.asarray(weights)
    expected_during = (np.asarray(losses.mixture_nll(held)) * w).sum() / w.sum()
    expected_after = (np.asarray(losses.mixture_nll(lp)) * w).sum() / w.sum()
    np.testing.assert_allclose(float(during), expected_during, rtol=1e-5)
    np.testing.assert_allclose(float(after), expected_after, rtol=1e-5)


def test_padding_tokens_do_not_count():
    logits, targets, weights = _batch()
    loss, metrics = _objective(_config(pause_ce_config, step_ce_weight=0.0))(logits, targets, weights, 0)
    changed = logits.at[1, 1:].set(1e4)
    loss_changed, _ = _objective(_config(pause_ce_config, step_ce_weight=0.0))(changed, targets, weights, 0)
    assert float(loss) == pytest.approx(float(loss_changed), rel=1e-6)
    assert float(metrics["pauses"]) == pytest.approx(2.0)


def test_world_stop_reaches_the_loss():
    lp, _, _ = _log_probs(np.random.default_rng(3))
    config = _config(ap_config, world_stop="1:1:1")
    forced = objective.make_loss_fn(config)(lp)
    expected = losses.cyb_ap(lp, world_stop=(1, 1, 1), discount=None)
    np.testing.assert_allclose(np.asarray(forced), np.asarray(expected), rtol=1e-6)
    default = objective.make_loss_fn(_config(ap_config))(lp)
    assert not np.allclose(np.asarray(forced), np.asarray(default))
