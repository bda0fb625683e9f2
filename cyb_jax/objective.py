"""The training objective and the per-token statistics reported for it.

`make_objective` binds a loss of `losses.py` to the run config and adds the
options beyond the CYB paper (Galashov et al. 2025, arXiv:2510.13879) that fight the collapse to never pausing: an
auxiliary cross-entropy on every step's t_i, and a warm-up that holds d at the
DK prior. `token_statistics` computes the quantities that training and
evaluation log: per-step NLL, the read-out NLL, expected pauses and mean d_i.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cyb_jax import losses
from cyb_jax import model as model_lib

# A pause model with fewer expected pauses than this per token is reported as collapsed.
COLLAPSE_PAUSES = 0.05
# Threshold on d_i of the self-paced (deployed) read-out: wait while d_i > tau.
SELF_PACED_THRESHOLD = 0.5
# d used by the DK warm-up when the model has no DK prior.
DEFAULT_WARMUP_DK = 0.5

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def make_loss_fn(config: ml_collections.ConfigDict) -> Callable[[losses.StepLogProbs], jax.Array]:
    """Bind the loss named by `config.loss.name` to the hyper-parameters it uses."""
    loss = config.loss
    hyper_parameters = {}
    if loss.name in ("ap", "va", "dp"):
        hyper_parameters.update(gamma=loss.gamma, discount_kind=loss.discount_kind)
    if loss.name == "ap" and config.pause.recipe == "fixed":
        # Recipe 'sampled' draws the world's grant per token instead, so the loss then
        # uses omega = 0:...:0:1 and the grant enters through d = 0 at the last granted step.
        hyper_parameters["world_stop"] = loss.world_stop or None
    if loss.name in ("va", "dp"):
        hyper_parameters["prior"] = loss.prior or None
    if loss.name == "va":
        hyper_parameters["beta"] = loss.beta
    if loss.name == "dp":
        hyper_parameters["alpha"] = loss.alpha
    return losses.make_loss(loss.name, window=config.pause.window, **hyper_parameters)


PAUSE_RECIPES = ("fixed", "sampled")

GrantSampler = Callable[[jax.Array, tuple[int, ...]], jax.Array]


def make_grant_sampler(config: ml_collections.ConfigDict) -> GrantSampler | None:
    """Return `sample(key, shape) -> granted steps` for recipe 'sampled', None for 'fixed'.

    The granted steps are drawn per token from the world distribution
    `config.loss.world_stop` (0:...:0:1 when empty) and lie in 1..W.
    """
    recipe = config.pause.recipe
    if recipe not in PAUSE_RECIPES:
        raise ValueError(f"pause.recipe must be one of {PAUSE_RECIPES}, got {recipe!r}.")
    if recipe == "fixed":
        return None
    window = config.pause.window
    world = losses.parse_ratios(config.loss.world_stop or np.eye(window)[-1], window, "world_stop")
    with np.errstate(divide="ignore"):
        log_world = np.log(world)

    def sample(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return 1 + jax.random.categorical(key, jnp.asarray(log_world, jnp.float32), shape=shape)

    return sample


def end_at_granted_step(log_probs: losses.StepLogProbs, granted_steps: jax.Array) -> losses.StepLogProbs:
    """Set d = 0 at each token's last granted step, so that no later step gets mass."""
    window = log_probs.target.shape[-1]
    last_BxLxW = jnp.arange(window)[None, None, :] == (granted_steps - 1)[..., None]
    return losses.StepLogProbs(
        target=log_probs.target,
        dont_know=jnp.where(last_BxLxW, -jnp.inf, log_probs.dont_know),
        answer=jnp.where(last_BxLxW, 0.0, log_probs.answer),
    )


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_objective(
    config: ml_collections.ConfigDict, model_config: model_lib.TransformerConfig
) -> Objective:
    """Return `objective(predictions, targets, weights, step, granted_steps=None) -> (loss, metrics)`.

    `predictions` is either the model's logits [B, L, W, V + 1] or the
    `losses.StepLogProbs` of `targets` that the model returns when given them, each
    array [B, L, W]. With `granted_steps` [B, L] (recipe 'sampled'), the loss ends
    each token's window at its last granted step, and the auxiliary cross-entropy
    averages over the granted steps only.
    """
    loss_fn = make_loss_fn(config)
    loss_name = config.loss.name
    step_ce_weight = float(config.loss.step_ce_weight)
    warmup_steps = int(config.loss.dk_warmup_steps)
    warmup_dk = model_config.dk_prior or DEFAULT_WARMUP_DK
    dk_id = model_config.dk_id
    window = model_config.window

    def objective(predictions, targets_BxL, weights_BxL, step, granted_steps_BxL=None):
        if isinstance(predictions, losses.StepLogProbs):
            log_probs = predictions
        else:
            log_probs = losses.step_log_probs(predictions, targets_BxL, dk_id)
        trained = log_probs
        if warmup_steps > 0:
            held = losses.StepLogProbs(
                target=log_probs.target,
                dont_know=jnp.full_like(log_probs.dont_know, jnp.log(warmup_dk)),
                answer=jnp.full_like(log_probs.answer, jnp.log1p(-warmup_dk)),
            )
            in_warmup = step < warmup_steps
            trained = jax.tree.map(lambda h, m: jnp.where(in_warmup, h, m), held, log_probs)
        if granted_steps_BxL is not None:
            trained = end_at_granted_step(trained, granted_steps_BxL)
        per_token_BxL = loss_fn(trained)
        if step_ce_weight > 0.0:
            step_nll_BxLxW = -log_probs.target
            if granted_steps_BxL is not None:
                granted_BxLxW = jnp.arange(window)[None, None, :] < granted_steps_BxL[..., None]
                step_nll_BxLxW = jnp.where(granted_BxLxW, step_nll_BxLxW, 0.0)
                step_ce_BxL = jnp.sum(step_nll_BxLxW, axis=-1) / granted_steps_BxL
            else:
                step_ce_BxL = jnp.mean(step_nll_BxLxW, axis=-1)
            per_token_BxL = per_token_BxL + step_ce_weight * step_ce_BxL
        loss = _masked_mean(per_token_BxL, weights_BxL)
        # NOTE: the metrics describe the model with every step granted, also under recipe
        # 'sampled', so a step's train/nll_step_i includes slots that the loss left out.
        stats = token_statistics(jax.lax.stop_gradient(log_probs), loss_name)
        metrics = {name: _masked_mean(value, weights_BxL) for name, value in stats.items()}
        metrics["loss"] = loss
        return loss, metrics

    return objective


def token_statistics(log_probs: losses.StepLogProbs, loss_name: str) -> dict[str, jax.Array]:
    """Per-token quantities [B, L] under the model's own read-out rule.

    `nll` is the read-out NLL whose exponentiated mean is the perplexity: step 0 for
    'ce', the last step for 'pause_ce', and for CYB losses the mixture over the
    model's halting distribution (omega = 0:...:0:1, gamma = 1). `pauses` is the
    number of pauses the read-out spends on the token (expected, for CYB).
    """
    window = log_probs.target.shape[-1]
    stats = {f"nll_step_{i}": -log_probs.target[..., i] for i in range(window)}
    if loss_name == "ce":
        stats["nll"] = -log_probs.target[..., 0]
        stats["pauses"] = jnp.zeros_like(stats["nll"])
    elif loss_name == "pause_ce":
        stats["nll"] = -log_probs.target[..., -1]
        stats["pauses"] = jnp.full_like(stats["nll"], window - 1)
    else:
        stats["nll"] = losses.mixture_nll(log_probs)
        no_forced_stop = np.eye(window)[-1]
        halting = losses.stopping_distribution(log_probs, no_forced_stop)
        stats["pauses"] = losses.expected_pauses(halting)
        stats.update(_self_paced(log_probs))
    stats["pauses_squared"] = jnp.square(stats["pauses"])
    for i in range(window - 1):
        stats[f"dk_step_{i}"] = jnp.exp(log_probs.dont_know[..., i])
    return stats


def _self_paced(log_probs: losses.StepLogProbs) -> dict[str, jax.Array]:
    """NLL and pauses of the deployed rule: answer at the first step with d_i <= tau."""
    window = log_probs.target.shape[-1]
    answers_BxLxW = log_probs.dont_know <= jnp.log(SELF_PACED_THRESHOLD)
    answers_BxLxW = answers_BxLxW.at[..., window - 1].set(True)
    stop_BxL = jnp.argmax(answers_BxLxW, axis=-1)
    nll_BxL = -jnp.take_along_axis(log_probs.target, stop_BxL[..., None], axis=-1)[..., 0]
    return {"self_paced_nll": nll_BxL, "self_paced_pauses": stop_BxL.astype(jnp.float32)}
