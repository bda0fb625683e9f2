"""Catch Your Breath (CYB) losses for models that may output don't-know and pause.

Source: Galashov et al. 2025, "Catch Your Breath: Adaptive Computation for
Self-Paced Sequence Production", arXiv:2510.13879. Steps are numbered from 0 here.

A real token owns a window of W steps. At step i the model outputs logits over the V
real tokens plus one don't-know (DK) entry. For the target y, every loss needs only
three numbers per step, all in log space (`StepLogProbs`):

  target     log t_i       probability of y among the real tokens (DK removed)
  dont_know  log d_i       DK probability
  answer     log(1 - d_i)  probability of answering instead of outputting DK

The world grants W_t in {1..W} steps with probability ω_{W_t - 1} (`world_stop`).
The model answers at the first step where it does not output DK, when the grant runs
out, or at the last step, where d_{W-1} := 0. The step S of the answer has

  Pr(S = i) = (ω_i + (1 - d_i) Σ_{k>i} ω_k) Π_{j<i} d_j.

With ω = 0:…:0:1 this is the model's own halting distribution
s_i = (1 - d_i) Π_{j<i} d_j. With discounts γ_i in [0, 1] and a prior ρ over S, the
losses, one value per real token (the caller reduces over tokens and masks padding), are

  ce        -log t_0
  pause_ce  -log t_{W-1}
  ap        -log Σ_i Pr(S = i) γ_i t_i
  va        -Σ_i s_i log(γ_i t_i) + β KL(s ‖ ρ)
  dp        ap with ω = 0:…:0:1, plus α KL(ρ ‖ s)

Numerical conventions:

- Everything stays in log space. log(1 - d_i) is lse_V - lse_all, never
  log1p(-exp(log d_i)), so it stays accurate when d_i is close to 1.
- `jax.lax.scan` walks the pause axis, the last axis of every per-step array. Its carry
  is the log survival Σ_{j<i} log d_j and a running log-sum-exp of
  log Pr(S = i) + log γ_i + log t_i, so ap needs no second pass.
- Zero weights (ω_i, γ_i, ρ_i) become log weights of -inf. Each two-term log-sum-exp
  goes through `_log_add_exp`, which uses the double-`where` pattern: when both terms
  are -inf, the untaken branch sees finite stand-ins, so no NaN reaches a gradient.
- d_{W-1} := 0 needs no special case, because Σ_{k>W-1} ω_k = 0 removes the last
  step's log(1 - d) and the survival after the last step is discarded. Both entries
  get a zero gradient.
- va uses 0 log 0 = 0, so a step with s_i = 0 adds nothing. For finite logits every
  s_i is positive, so KL(s ‖ ρ) and -s_i log γ_i would be infinite wherever ρ_i or γ_i
  is 0. va therefore rejects a prior or a discount with zeros.
- dp uses the reversed KL(ρ ‖ s) = Σ_i ρ_i log(ρ_i / s_i), so ρ may contain zeros.
  Steps with ρ_i = 0 are dropped from the sum before any logarithm is taken, because
  their indices are known at trace time.
- Hyper-parameters must be concrete Python or numpy values. They are validated when a
  function is called or traced, and invalid ones raise ValueError naming the argument.
- Computation runs in float32 at least: bfloat16 input is upcast, float64 stays float64.
"""

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


class StepLogProbs(NamedTuple):
    """Per-step log probabilities of one prediction window, each of shape [..., W]."""

    target: jax.Array  # log t_i
    dont_know: jax.Array  # log d_i
    answer: jax.Array  # log(1 - d_i)


DISCOUNT_KINDS = ("constant", "linear", "exponential")

Ratios = str | Sequence[float] | np.ndarray


def _format_values(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")


def _concrete_vector(values: object, window: int, name: str) -> np.ndarray:
    """Convert to a float64 vector with one finite entry per step, or raise ValueError."""
    if isinstance(values, str):
        try:
            vector = np.array([float(part) for part in values.split(":")])
        except ValueError:
            raise ValueError(
                f"{name} must be numbers separated by ':', such as '0:0:0:1', got {values!r}"
            ) from None
    else:
        try:
            vector = np.asarray(values, dtype=np.float64)
        except jax.errors.JAXTypeError:
            raise ValueError(
                f"{name} must be concrete Python or numpy numbers, not a traced JAX array"
            ) from None
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if vector.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {vector.shape}")
    if vector.size != window:
        raise ValueError(
            f"{name} must have {window} entries, one per pause step (window={window}), "
            f"got {vector.size}: {_format_values(vector)}"
        )
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"{name} must be finite, got {_format_values(vector)}")
    return vector


def parse_ratios(ratios: Ratios, window: int, name: str) -> np.ndarray:
    """Validate a distribution over the W steps and return it normalised to sum 1.

    `ratios` is a string such as "0:0:0:1", or a sequence or numpy array of W
    non-negative numbers with a positive total. Raises ValueError naming `name`.
    """
    _check_window(window)
    vector = _concrete_vector(ratios, window, name)
    if np.any(vector < 0):
        raise ValueError(f"{name} must be non-negative, got {_format_values(vector)}")
    if vector.sum() <= 0:
        raise ValueError(f"{name} must have a positive total, got {_format_values(vector)}")
    return vector / vector.sum()


def _parse_discount(discount: ArrayLike | None, window: int) -> np.ndarray:
    """Validate per-step discounts γ_i in [0, 1]. None means γ_i = 1."""
    if discount is None:
        return np.ones(window)
    gamma = _concrete_vector(discount, window, "discount")
    if np.any(gamma < 0) or np.any(gamma > 1):
        raise ValueError(f"discount must be in [0, 1] at every step, got {_format_values(gamma)}")
    return gamma


def _concrete_float(value: object, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # a traced value raises ConcretizationTypeError, a TypeError
        raise ValueError(
            f"{name} must be a concrete Python or numpy number, got {value!r}"
        ) from None


def _check_weight(value: float, name: str) -> float:
    """Return `value` as a float, or raise ValueError unless it is finite and >= 0."""
    number = _concrete_float(value, name)
    if not np.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite, non-negative number, got {value!r}")
    return number


def _check_ap_discount(world: np.ndarray, gamma: np.ndarray) -> None:
    """Raise ValueError when γ is 0 at every step where the model can stop under ω."""
    last_granted = int(np.flatnonzero(world)[-1])
    if not np.any(gamma[: last_granted + 1] > 0):
        raise ValueError(
            f"discount is 0 at every step where the model can stop (steps 0..{last_granted} "
            f"under world_stop={_format_values(world)}), so the loss is infinite. "
            f"Got discount={_format_values(gamma)}"
        )


def _check_va_weights(rho: np.ndarray, gamma: np.ndarray) -> None:
    """Raise ValueError unless ρ and γ are positive at every step, as va requires."""
    if np.any(rho == 0):
        raise ValueError(
            "prior must be positive at every step for the 'va' loss, because KL(s ‖ prior) "
            f"is infinite where prior is 0. Got {_format_values(rho)}. "
            "The 'dp' loss uses KL(prior ‖ s), which allows zeros"
        )
    if np.any(gamma == 0):
        raise ValueError(
            "discount must be positive at every step for the 'va' loss, because "
            f"-s_i log(discount_i) is infinite where it is 0. Got {_format_values(gamma)}"
        )


def _discount_schedule(gamma: float, window: int, kind: str, name: str) -> np.ndarray:
    """Implement `discount_schedule`, with `name` as the scalar's name in error messages."""
    _check_window(window)
    if kind not in DISCOUNT_KINDS:
        raise ValueError(f"discount_kind must be one of {', '.join(DISCOUNT_KINDS)}, got {kind!r}")
    if not 0 <= _concrete_float(gamma, name) <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {gamma!r}")
    steps = np.arange(window, dtype=np.float64)
    if kind == "constant":
        if gamma != 1:
            raise ValueError(
                f"{name}={gamma!r} has no effect with discount_kind='constant', which sets "
                "every discount to 1. Use 'linear' or 'exponential', or set it to 1"
            )
        return np.ones(window)
    if kind == "exponential":
        return float(gamma) ** steps
    schedule = 1.0 - steps * (1.0 - gamma)
    schedule[np.abs(schedule) < 1e-12] = 0.0  # rounding error, as in 1 - 3 * (1 - 2/3)
    if np.any(schedule < 0):
        raise ValueError(
            f"{name}={gamma!r} with discount_kind='linear' makes the discount negative at "
            f"step {int(np.argmax(schedule < 0))} (window={window}). "
            f"Use {name} >= {1 - 1 / (window - 1):.6g}"
        )
    return schedule


def discount_schedule(gamma0: float, window: int, kind: str) -> np.ndarray:
    """Build the per-step discounts γ_i, i = 0..window-1, from the scalar `gamma0`.

    'constant': γ_i = 1 (`gamma0` must be 1), 'linear': γ_i = 1 - i (1 - gamma0),
    'exponential': γ_i = gamma0 ** i. Step 0 always gets 1 and step 1 gets `gamma0`.
    Raises ValueError when `gamma0` is outside [0, 1] or a linear schedule would turn
    negative within the window.
    """
    return _discount_schedule(gamma0, window, kind, "gamma0")


def _last_step_only(window: int) -> np.ndarray:
    """Return ω = 0:…:0:1, a world that always grants every step."""
    return np.eye(window)[-1]


def step_log_probs(logits: ArrayLike, targets: ArrayLike, dk_id: int) -> StepLogProbs:
    """Compute log t_i, log d_i and log(1 - d_i) for every step of every window.

    `logits` has shape [..., W, V+1] with the DK logit last (`dk_id` must be V or -1).
    `targets` contains integer token ids of shape [...], one per real token, shared by
    the W steps of its window. Out-of-range targets, such as a padding id of -1, are
    clipped into [0, V), so they give finite values that the caller must mask out.
    """
    logits = jnp.asarray(logits)
    targets = jnp.asarray(targets)
    if logits.ndim < 2 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have shape [..., W, V+1] with V >= 1, got {logits.shape}")
    vocab = logits.shape[-1] - 1
    if dk_id not in (vocab, -1):
        raise ValueError(
            f"dk_id must be the last logit index ({vocab}, or -1), got {dk_id}. "
            "Put the DK logit after the real tokens"
        )
    if targets.shape != logits.shape[:-2]:
        raise ValueError(
            f"targets must have shape {logits.shape[:-2]} (logits without the W and V+1 axes), "
            f"got {targets.shape}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")

    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    real_logits = logits[..., :vocab]
    dk_logit = logits[..., vocab]
    lse_real = jax.nn.logsumexp(real_logits, axis=-1)
    lse_all = jnp.logaddexp(lse_real, dk_logit)

    target_ids = jnp.broadcast_to(targets[..., None, None], (*logits.shape[:-1], 1))
    target_logit = jnp.take_along_axis(real_logits, target_ids, axis=-1, mode="clip")[..., 0]
    return StepLogProbs(
        target=target_logit - lse_real, dont_know=dk_logit - lse_all, answer=lse_real - lse_all
    )


def _as_float(lp: StepLogProbs) -> StepLogProbs:
    """Check that the three arrays share a shape [..., W] and cast them to float32 at least."""
    arrays = [jnp.asarray(array) for array in lp]
    if len({array.shape for array in arrays}) != 1 or arrays[0].ndim == 0:
        raise ValueError(
            "target, dont_know and answer must share one shape [..., W], got "
            f"{[array.shape for array in arrays]}"
        )
    dtype = jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
    return StepLogProbs(*(array.astype(dtype) for array in arrays))


def _log(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(values)


def _along_pause_axis(values: np.ndarray, like: jax.Array) -> jax.Array:
    """Reshape a [W] constant to [1, ..., 1, W] so that it broadcasts without rank promotion."""
    shape = (1,) * (like.ndim - 1) + (values.shape[0],)
    return jnp.asarray(values, dtype=like.dtype).reshape(shape)


def _log_add_exp(a: jax.Array, b: jax.Array) -> jax.Array:
    """Compute log(exp(a) + exp(b)) with finite gradients when a, b or both are -inf."""
    largest = jnp.maximum(a, b)
    finite = jnp.isfinite(largest)
    shift = jax.lax.stop_gradient(jnp.where(finite, largest, 0.0))
    total = jnp.exp(a - shift) + jnp.exp(b - shift)
    safe_total = jnp.where(finite, total, 1.0)
    return jnp.where(finite, shift + jnp.log(safe_total), largest)


def _scan_step(carry, inputs):
    """Advance one step. The carry is (Σ_{j<i} log d_j, log Σ_{j<i} Pr(S = j) γ_j t_j)."""
    log_survival, log_value = carry
    log_t, log_d, log_answer, log_world, log_world_after, log_discount = inputs
    log_stop = log_survival + _log_add_exp(log_world, log_answer + log_world_after)
    log_value = _log_add_exp(log_value, log_stop + log_discount + log_t)
    return (log_survival + log_d, log_value), log_stop


def _scan_steps(
    lp: StepLogProbs, world: np.ndarray, discount: np.ndarray
) -> tuple[jax.Array, jax.Array]:
    """Compute log Pr(S = i) [..., W] and log Σ_i Pr(S = i) γ_i t_i [...].

    `world` is the normalised ω and `discount` the γ_i, both validated numpy vectors.
    """
    dtype = lp.target.dtype
    world_after = np.append(np.cumsum(world[::-1])[::-1][1:], 0.0)  # Σ_{k>i} ω_k
    step_constants = tuple(
        jnp.asarray(_log(values), dtype=dtype) for values in (world, world_after, discount)
    )
    per_step = tuple(jnp.moveaxis(array, -1, 0) for array in lp)
    batch_shape = lp.target.shape[:-1]
    init = (jnp.zeros(batch_shape, dtype), jnp.full(batch_shape, -jnp.inf, dtype))
    (_, log_value), log_stop = jax.lax.scan(_scan_step, init, per_step + step_constants)
    return jnp.moveaxis(log_stop, 0, -1), log_value


def stopping_distribution(log_probs: StepLogProbs, world_stop: Ratios | None = None) -> jax.Array:
    """Compute log Pr(S = i) [..., W] under the world distribution ω = `world_stop`.

    `world_stop` gives W ratios, normalised here. None means ω = 0:…:0:1, which gives
    the model's own halting distribution. The last step has d_{W-1} := 0.
    """
    lp = _as_float(log_probs)
    window = lp.target.shape[-1]
    if world_stop is None:
        world = _last_step_only(window)
    else:
        world = parse_ratios(world_stop, window, "world_stop")
    log_stop, _ = _scan_steps(lp, world, np.ones(window))
    return log_stop


def expected_pauses(log_stop: ArrayLike) -> jax.Array:
    """Compute E[S] = Σ_i i Pr(S = i), the expected number of pauses, from log Pr(S = i)."""
    log_stop = jnp.asarray(log_stop)
    steps = _along_pause_axis(np.arange(log_stop.shape[-1], dtype=np.float64), log_stop)
    return jnp.sum(steps * jnp.exp(log_stop), axis=-1)


def cross_entropy(lp: StepLogProbs) -> jax.Array:
    """Compute -log t_0, the no-pause cross-entropy read at step 0."""
    return -_as_float(lp).target[..., 0]


def pause_cross_entropy(lp: StepLogProbs) -> jax.Array:
    """Compute -log t_{W-1}, the cross-entropy read at the last step of the window."""
    return -_as_float(lp).target[..., -1]


def cyb_ap(lp: StepLogProbs, *, world_stop: Ratios, discount: ArrayLike | None) -> jax.Array:
    """Compute the anytime-prediction loss -log Σ_i Pr(S = i | d, ω) γ_i t_i.

    `world_stop` gives ω as W ratios, and `discount` gives γ_i in [0, 1] (None for
    γ_i = 1). Raises ValueError when γ is 0 at every step where the model can stop,
    because the loss would then be infinite for every input.
    """
    lp = _as_float(lp)
    window = lp.target.shape[-1]
    world = parse_ratios(world_stop, window, "world_stop")
    gamma = _parse_discount(discount, window)
    _check_ap_discount(world, gamma)
    _, log_value = _scan_steps(lp, world, gamma)
    return -log_value


def mixture_nll(lp: StepLogProbs) -> jax.Array:
    """Compute -log Σ_i s_i t_i, the negative log-likelihood of the model's own read-out.

    Σ_i s_i t_i(y) is a proper distribution over y, so exp(mean loss) is a perplexity.
    This is `cyb_ap` with ω = 0:…:0:1 and γ = 1.
    """
    window = jnp.shape(lp.target)[-1]
    return cyb_ap(lp, world_stop=_last_step_only(window), discount=None)


def cyb_va(
    lp: StepLogProbs, *, prior: Ratios, discount: ArrayLike | None = None, beta: float = 1.0
) -> jax.Array:
    """Compute the variational loss -Σ_i s_i log(γ_i t_i) + β KL(s ‖ ρ).

    s is the halting distribution (ω = 0:…:0:1), ρ = `prior` (W ratios) and γ =
    `discount` (None for γ_i = 1). ρ and γ must be positive at every step, because the
    loss is infinite where either is 0. `cyb_dp` accepts a prior with zeros.
    """
    lp = _as_float(lp)
    window = lp.target.shape[-1]
    rho = parse_ratios(prior, window, "prior")
    gamma = _parse_discount(discount, window)
    beta = _check_weight(beta, "beta")
    _check_va_weights(rho, gamma)

    log_s, _ = _scan_steps(lp, _last_step_only(window), gamma)
    log_reward = lp.target + _along_pause_axis(_log(gamma), log_s)
    log_rho = _along_pause_axis(_log(rho), log_s)
    # 0 log 0 = 0: a step without stopping mass adds nothing. The inner `where` keeps
    # -inf out of the untaken branch so that its gradient stays finite.
    has_mass = log_s > -jnp.inf
    safe_log_s = jnp.where(has_mass, log_s, 0.0)
    per_step = jnp.exp(safe_log_s) * (beta * (safe_log_s - log_rho) - log_reward)
    return jnp.sum(jnp.where(has_mass, per_step, 0.0), axis=-1)


def cyb_dp(
    lp: StepLogProbs, *, prior: Ratios, alpha: float, discount: ArrayLike | None = None
) -> jax.Array:
    """Compute the distributional-penalty loss ℓ_AP(ω = 0:…:0:1, γ) + α KL(ρ ‖ s).

    ρ = `prior` (W ratios, zeros allowed), α = `alpha` >= 0, γ = `discount` (None for
    γ_i = 1), and s is the halting distribution.
    """
    lp = _as_float(lp)
    window = lp.target.shape[-1]
    rho = parse_ratios(prior, window, "prior")
    gamma = _parse_discount(discount, window)
    alpha = _check_weight(alpha, "alpha")
    _check_ap_discount(_last_step_only(window), gamma)

    log_s, log_value = _scan_steps(lp, _last_step_only(window), gamma)
    # KL(ρ ‖ s) over the support of ρ only, so steps with ρ_i = 0 contribute exactly 0.
    support = np.flatnonzero(rho)
    log_s_support = log_s[..., support]
    rho_support = _along_pause_axis(rho[support], log_s_support)
    log_rho_support = _along_pause_axis(np.log(rho[support]), log_s_support)
    kl = jnp.sum(rho_support * (log_rho_support - log_s_support), axis=-1)
    return -log_value + alpha * kl


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "ce": cross_entropy,
    "pause_ce": pause_cross_entropy,
    "ap": cyb_ap,
    "va": cyb_va,
    "dp": cyb_dp,
}


def make_loss(
    name: str,
    *,
    window: int,
    world_stop: Ratios | None = None,
    gamma: float = 1.0,
    discount_kind: str = "constant",
    prior: Ratios | None = None,
    alpha: float | None = None,
    beta: float = 1.0,
) -> Callable[[StepLogProbs], jax.Array]:
    """Validate the hyper-parameters of loss `name` and bind them to its function.

    Returns a function from `StepLogProbs` to the per-token loss. `gamma` and
    `discount_kind` build γ with `discount_schedule`. `world_stop` (ω, default
    0:…:0:1) applies to 'ap'. 'va' needs `prior` and takes `beta`, and 'dp' needs
    `prior` and `alpha`. Raises ValueError for an unknown name, a missing or invalid
    hyper-parameter, or one that the chosen loss would ignore.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss name {name!r}. Known names: {', '.join(LOSSES)}")
    _check_window(window)
    world = _last_step_only(window)
    if world_stop is not None:
        world = parse_ratios(world_stop, window, "world_stop")
    discount = _discount_schedule(gamma, window, discount_kind, "gamma")

    # 'va' and 'dp' always use ω = 0:…:0:1, so they accept only that world_stop.
    ignored = [
        (label, users)
        for label, is_set, users in (
            ("world_stop", not np.array_equal(world, _last_step_only(window)), ("ap",)),
            ("gamma", np.any(discount != 1), ("ap", "va", "dp")),
            ("prior", prior is not None, ("va", "dp")),
            ("alpha", alpha is not None, ("dp",)),
            ("beta", beta != 1.0, ("va",)),
        )
        if is_set and name not in users
    ]
    if ignored:
        label, users = ignored[0]
        raise ValueError(
            f"{label} has no effect on the {name!r} loss, only on {', '.join(map(repr, users))}. "
            "Leave it at its default"
        )
    if name in ("va", "dp") and prior is None:
        raise ValueError(
            f"the {name!r} loss needs prior, the target distribution of the stopping step"
        )
    if name == "dp" and alpha is None:
        raise ValueError("the 'dp' loss needs alpha, the weight of KL(prior ‖ s)")

    if name == "ap":
        _check_ap_discount(world, discount)
        return functools.partial(cyb_ap, world_stop=world, discount=discount)
    if name == "va":
        rho = parse_ratios(prior, window, "prior")
        _check_va_weights(rho, discount)
        beta = _check_weight(beta, "beta")
        return functools.partial(cyb_va, prior=rho, discount=discount, beta=beta)
    if name == "dp":
        rho = parse_ratios(prior, window, "prior")
        _check_ap_discount(world, discount)
        alpha = _check_weight(alpha, "alpha")
        return functools.partial(cyb_dp, prior=rho, alpha=alpha, discount=discount)
    return LOSSES[name]
