"""Tests for cyb_jax.losses against NumPy references, brute force and simulation."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from cyb_jax import losses


@dataclasses.dataclass(frozen=True)
class Mode:
    """How a test runs the code under test: jitted or eager, in float32 or float64."""

    jit: bool
    dtype: type

    @property
    def rtol(self) -> float:
        return 2e-5 if self.dtype == np.float32 else 1e-11

    def cast(self, values) -> np.ndarray:
        return np.asarray(values, dtype=self.dtype)

    def compile(self, fn):
        """Return `fn` jitted or as is, with outputs converted to numpy."""
        compiled = jax.jit(fn) if self.jit else fn
        return lambda *args: jax.tree.map(np.asarray, compiled(*args))

    def run(self, fn, *args, **kwargs):
        return self.compile(functools.partial(fn, **kwargs))(*args)


@pytest.fixture(
    params=[
        Mode(jit=False, dtype=np.float32),
        Mode(jit=True, dtype=np.float32),
        Mode(jit=False, dtype=np.float64),
        Mode(jit=True, dtype=np.float64),
    ],
    ids=["eager-f32", "jit-f32", "eager-f64", "jit-f64"],
)
def mode(request):
    if request.param.dtype == np.float64:
        with jax.enable_x64(True):
            yield request.param
    else:
        yield request.param


# ---------------------------------------------------------------------------
# NumPy references, all in float64

# Most tests share these shapes, so eager runs reuse compiled primitives.
BATCH, WINDOW, VOCAB = 6, 4, 6


def random_logits(rng, window=WINDOW, batch=BATCH, scale=2.0):
    """Return logits [batch, window, VOCAB+1] with the DK logit last, and targets [batch]."""
    logits = scale * rng.normal(size=(batch, window, VOCAB + 1))
    targets = rng.integers(0, VOCAB, size=batch)
    return logits, targets


def reference_probs(logits, targets):
    """Return t_i and d_i [..., W] by a direct softmax."""
    logits = np.asarray(logits, np.float64)
    real = scipy.special.softmax(logits[..., :-1], axis=-1)
    ids = np.broadcast_to(targets[..., None, None], (*logits.shape[:-1], 1))
    t = np.take_along_axis(real, ids, axis=-1)[..., 0]
    d = scipy.special.softmax(logits, axis=-1)[..., -1]
    return t, d


def reference_halting(d):
    """s_i = (1 - d_i) Π_{j<i} d_j with d_{W-1} = 0, by an explicit product."""
    s = np.zeros_like(d)
    for i in range(d.shape[-1]):
        answer = 1 - d[..., i] if i < d.shape[-1] - 1 else 1.0
        s[..., i] = answer * np.prod(d[..., :i], axis=-1)
    return s


def reference_stopping(d, world):
    """Pr(S = i) = (ω_i + (1 - d_i) Σ_{k>i} ω_k) Π_{j<i} d_j with d_{W-1} = 0."""
    world = np.asarray(world, np.float64) / np.sum(world)
    d = d.copy()
    d[..., -1] = 0.0
    after = np.cumsum(world[::-1])[::-1] - world
    reach = np.cumprod(np.concatenate([np.ones_like(d[..., :1]), d[..., :-1]], -1), -1)
    return (world + (1 - d) * after) * reach


def brute_force_stopping(d, world):
    """Enumerate every grant and DK/answer path for one window d [W]."""
    window = len(d)
    world = np.asarray(world, np.float64) / np.sum(world)
    probs = np.zeros(window)
    for grant in range(window):  # the world grants steps 0..grant
        for says_dk in itertools.product((True, False), repeat=window - 1):
            path_prob = world[grant]
            for step, dk in enumerate(says_dk):
                path_prob *= d[step] if dk else 1 - d[step]
            first_answer = next((i for i, dk in enumerate(says_dk) if not dk), window - 1)
            probs[min(first_answer, grant)] += path_prob
    return probs


def reference_ap(t, d, world, discount):
    return -np.log(np.sum(reference_stopping(d, world) * discount * t, axis=-1))


def reference_va(t, d, prior, discount, beta):
    s = reference_halting(d)
    rho = np.asarray(prior, np.float64) / np.sum(prior)
    return -np.sum(s * np.log(discount * t), -1) + beta * np.sum(s * np.log(s / rho), -1)


def reference_dp(t, d, prior, alpha, discount):
    s = reference_halting(d)
    rho = np.asarray(prior, np.float64) / np.sum(prior)
    support = rho > 0
    kl = np.sum(rho[support] * np.log(rho[support] / s[..., support]), -1)
    return -np.log(np.sum(s * discount * t, axis=-1)) + alpha * kl


def ratios(text):
    return np.array([float(part) for part in text.split(":")])


def lp_from_logits(logits, targets):
    return losses.step_log_probs(logits, targets, logits.shape[-1] - 1)


# ---------------------------------------------------------------------------
# step_log_probs


def test_step_log_probs_matches_numpy_softmax(mode):
    logits, targets = random_logits(np.random.default_rng(0))
    logits = mode.cast(logits)
    lp = mode.run(losses.step_log_probs, logits, targets, dk_id=VOCAB)
    t, d = reference_probs(logits, targets)

    assert lp.target.dtype == mode.dtype
    np.testing.assert_allclose(lp.target, np.log(t), rtol=mode.rtol, atol=mode.rtol)
    np.testing.assert_allclose(lp.dont_know, np.log(d), rtol=mode.rtol, atol=mode.rtol)
    np.testing.assert_allclose(lp.answer, np.log1p(-d), rtol=mode.rtol, atol=mode.rtol)


def test_step_log_probs_answer_near_certain_dk(mode):
    logits, targets = random_logits(np.random.default_rng(1))
    logits[0, 0] = 0.0
    logits[0, 0, -1] = 60.0  # d = 1 - 6 e^-60, so log1p(-exp(log d)) would give -inf
    lp = mode.run(losses.step_log_probs, mode.cast(logits), targets, dk_id=-1)
    expected = np.log(VOCAB) - np.logaddexp(np.log(VOCAB), 60.0)
    np.testing.assert_allclose(lp.answer[0, 0], expected, rtol=mode.rtol)


def test_step_log_probs_accepts_minus_one_dk_id():
    logits, targets = random_logits(np.random.default_rng(2))
    by_index = losses.step_log_probs(logits, targets, VOCAB)
    by_minus_one = losses.step_log_probs(logits, targets, -1)
    for a, b in zip(by_index, by_minus_one):
        np.testing.assert_array_equal(a, b)


def test_step_log_probs_upcasts_bfloat16():
    logits, targets = random_logits(np.random.default_rng(3))
    lp = losses.step_log_probs(jnp.asarray(logits, jnp.bfloat16), targets, VOCAB)
    assert all(array.dtype == jnp.float32 for array in lp)


def test_step_log_probs_clips_padding_targets():
    logits, targets = random_logits(np.random.default_rng(4))
    targets[:2] = [-1, 99]
    lp = losses.step_log_probs(logits, targets, VOCAB)
    assert np.all(np.isfinite(np.asarray(lp.target)))


@pytest.mark.parametrize(
    "logits_shape, targets_shape, dk_id, message",
    [
        ((2, 3, 6), (2,), 3, "dk_id must be the last logit index"),
        ((2, 3, 6), (3,), 5, r"targets must have shape \(2,\)"),
        ((6,), (), 5, r"logits must have shape \[..., W, V\+1\]"),
    ],
)
def test_step_log_probs_rejects_bad_shapes(logits_shape, targets_shape, dk_id, message):
    with pytest.raises(ValueError, match=message):
        losses.step_log_probs(np.zeros(logits_shape), np.zeros(targets_shape, int), dk_id)


def test_step_log_probs_rejects_float_targets():
    with pytest.raises(ValueError, match="targets must be integer token ids"):
        losses.step_log_probs(np.zeros((2, 3, 6)), np.zeros(2), 5)


# ---------------------------------------------------------------------------
# Sanity checks of the losses


def test_window_one_reduces_every_loss_to_ce(mode):
    logits, targets = random_logits(np.random.default_rng(5), window=1)

    def every_loss(logits):
        lp = lp_from_logits(logits, targets)
        return {
            "ce": losses.cross_entropy(lp),
            "pause_ce": losses.pause_cross_entropy(lp),
            "ap": losses.cyb_ap(lp, world_stop=[1], discount=[1]),
            "va": losses.cyb_va(lp, prior=[1], beta=0.5),
            "dp": losses.cyb_dp(lp, prior=[1], alpha=0.1),
            "mixture": losses.mixture_nll(lp),
        }

    results = mode.run(every_loss, mode.cast(logits))
    ce = results.pop("ce")
    t, _ = reference_probs(mode.cast(logits), targets)
    np.testing.assert_allclose(ce, -np.log(t[:, 0]), rtol=mode.rtol)
    for name, value in results.items():
        np.testing.assert_array_equal(value, ce, err_msg=name)


def test_pause_ce_equals_ap_when_dk_certain(mode):
    logits, targets = random_logits(np.random.default_rng(6))
    logits[:, :-1, -1] = 1e4  # d_i = 1 before the last step
    logits[:, -1, -1] = 50.0  # ignored, because d_{W-1} := 0

    def both_losses(logits):
        lp = lp_from_logits(logits, targets)
        return losses.cyb_ap(lp, world_stop="0:0:0:1", discount=None), losses.pause_cross_entropy(
            lp
        )

    ap, pause_ce = mode.run(both_losses, mode.cast(logits))
    np.testing.assert_allclose(ap, pause_ce, rtol=mode.rtol)
    t, _ = reference_probs(mode.cast(logits), targets)
    np.testing.assert_allclose(pause_ce, -np.log(t[:, -1]), rtol=mode.rtol)


def test_last_step_dont_know_gets_no_gradient(mode):
    logits, targets = random_logits(np.random.default_rng(26))
    lp = lp_from_logits(mode.cast(logits), targets)

    def total_loss(lp):
        return jnp.sum(losses.cyb_ap(lp, world_stop="1:0:2:1", discount=None))

    grads = mode.run(jax.grad(total_loss), lp)
    np.testing.assert_array_equal(grads.dont_know[:, -1], 0.0)
    np.testing.assert_array_equal(grads.answer[:, -1], 0.0)
    assert np.all(grads.dont_know[:, 0] != 0)


def test_stopping_distribution_equals_halting_distribution(mode):
    logits, targets = random_logits(np.random.default_rng(7))

    def both_forms(logits):
        lp = lp_from_logits(logits, targets)
        return losses.stopping_distribution(lp, "0:0:0:1"), losses.stopping_distribution(lp)

    _, d = reference_probs(mode.cast(logits), targets)
    for log_stop in mode.run(both_forms, mode.cast(logits)):
        np.testing.assert_allclose(
            np.exp(log_stop), reference_halting(d), rtol=mode.rtol, atol=mode.rtol
        )


def random_worlds(rng, window, count):
    """Return `count` random ω with zeros, each with a positive total."""
    worlds = rng.random((count, window)) * (rng.random((count, window)) < 0.5)
    worlds[np.arange(count), rng.integers(window, size=count)] += 0.5
    return list(worlds)


def stopping_cases(rng, mode, worlds_per_window):
    """Return (logits, targets, world) cases for windows 1, 2, 4 and 5."""
    cases = []
    for window in (1, 2, 4, 5):
        logits, targets = random_logits(rng, window=window, scale=3.0)
        for world in worlds_per_window(window):
            cases.append((mode.cast(logits), targets, world))
    return cases


def run_stopping_cases(mode, cases):
    def every_case(logits_per_case):
        return [
            losses.stopping_distribution(lp_from_logits(logits, targets), world)
            for logits, (_, targets, world) in zip(logits_per_case, cases)
        ]

    return mode.run(every_case, [logits for logits, _, _ in cases])


def test_stopping_distribution_sums_to_one(mode):
    rng = np.random.default_rng(8)
    cases = stopping_cases(rng, mode, lambda window: random_worlds(rng, window, 4))
    for log_stop, (_, _, world) in zip(run_stopping_cases(mode, cases), cases):
        total = np.exp(log_stop).sum(-1)
        np.testing.assert_allclose(total, 1.0, rtol=5 * mode.rtol, err_msg=str(world))


def test_stopping_distribution_matches_brute_force(mode):
    rng = np.random.default_rng(9)
    cases = stopping_cases(
        rng,
        mode,
        lambda window: [np.ones(window), np.eye(window)[-1], *random_worlds(rng, window, 2)],
    )
    for log_stop, (logits, targets, world) in zip(run_stopping_cases(mode, cases), cases):
        _, d = reference_probs(logits, targets)
        expected = np.stack([brute_force_stopping(row, world) for row in d])
        np.testing.assert_allclose(
            np.exp(log_stop), expected, rtol=mode.rtol, atol=mode.rtol, err_msg=str(world)
        )


def test_ap_matches_monte_carlo_simulation(mode):
    rng = np.random.default_rng(10)
    samples = 200_000
    logits, targets = random_logits(rng)
    world = np.array([0.2, 0.0, 0.3, 0.5])
    discount = losses.discount_schedule(0.8, WINDOW, "linear")
    loss = mode.run(
        lambda x: losses.cyb_ap(lp_from_logits(x, targets), world_stop=world, discount=discount),
        mode.cast(logits),
    )

    # Simulate window 0: the world's grant, DK or an answer at each step, then an
    # answer drawn from that step's distribution over real tokens.
    logits = np.asarray(mode.cast(logits[0]), np.float64)
    answer_probs = scipy.special.softmax(logits[:, :-1], axis=-1)
    _, d = reference_probs(logits, targets[0])
    last_granted = rng.choice(WINDOW, size=samples, p=world)
    says_dk = rng.random((samples, WINDOW)) < d
    says_dk[:, -1] = False
    stop = np.minimum(np.argmax(~says_dk, axis=1), last_granted)
    cdf = np.cumsum(answer_probs[stop], axis=1)
    answer = np.argmax(cdf > rng.random((samples, 1)), axis=1)
    score = discount[stop] * (answer == targets[0])

    standard_error = score.std() / np.sqrt(samples)
    assert standard_error > 0
    assert abs(score.mean() - np.exp(-loss[0])) < 4 * standard_error


def test_ap_two_steps_closed_form(mode):
    logits, targets = random_logits(np.random.default_rng(11), window=2)
    discount = np.array([0.9, 0.6])
    loss = mode.run(
        lambda x: losses.cyb_ap(lp_from_logits(x, targets), world_stop="0:1", discount=discount),
        mode.cast(logits),
    )

    t, d = reference_probs(mode.cast(logits), targets)
    expected = (1 - d[:, 0]) * discount[0] * t[:, 0] + d[:, 0] * discount[1] * t[:, 1]
    np.testing.assert_allclose(np.exp(-loss), expected, rtol=mode.rtol)


def test_ap_gradient_sign_two_steps(mode):
    logits, targets = random_logits(np.random.default_rng(12), window=2)
    discount = np.array([1.0, 0.7])

    def total_loss(logits):
        lp = lp_from_logits(logits, targets)
        return jnp.sum(losses.cyb_ap(lp, world_stop="0:1", discount=discount))

    grad = mode.run(jax.grad(total_loss), mode.cast(logits))[:, 0, -1]
    t, d = reference_probs(mode.cast(logits), targets)
    gain = discount[1] * t[:, 1] - discount[0] * t[:, 0]
    assert np.any(gain > 0)
    assert np.any(gain < 0)
    # d(-log mixture)/dz_dk0 = -gain d_0 (1 - d_0) / mixture, negative exactly when gain > 0.
    np.testing.assert_array_equal(np.sign(grad), -np.sign(gain))
    mixture = (1 - d[:, 0]) * discount[0] * t[:, 0] + d[:, 0] * discount[1] * t[:, 1]
    expected = -gain * d[:, 0] * (1 - d[:, 0]) / mixture
    np.testing.assert_allclose(grad, expected, rtol=20 * mode.rtol, atol=mode.rtol)


def test_ap_matches_numpy_formula(mode):
    logits, targets = random_logits(np.random.default_rng(13))
    cases = [
        ("0:0:0:1", np.ones(WINDOW)),
        ("1:1:1:1", losses.discount_schedule(0.9, WINDOW, "exponential")),
        ("0:2:0:1", np.array([0.0, 1.0, 0.0, 0.5])),
        ("1:0:0:0", np.array([1.0, 0.0, 0.0, 0.0])),
    ]

    def every_case(logits):
        lp = lp_from_logits(logits, targets)
        return [losses.cyb_ap(lp, world_stop=world, discount=discount) for world, discount in cases]

    t, d = reference_probs(mode.cast(logits), targets)
    for loss, (world, discount) in zip(mode.run(every_case, mode.cast(logits)), cases):
        expected = reference_ap(t, d, ratios(world), discount)
        np.testing.assert_allclose(loss, expected, rtol=mode.rtol, err_msg=world)


def test_mixture_nll_is_normalised_over_vocabulary(mode):
    logits, _ = random_logits(np.random.default_rng(14), batch=1)
    every_target = np.arange(VOCAB)
    logits_per_target = np.repeat(logits, VOCAB, axis=0)
    nll = mode.run(
        lambda x: losses.mixture_nll(lp_from_logits(x, every_target)), mode.cast(logits_per_target)
    )
    np.testing.assert_allclose(np.exp(-nll).sum(), 1.0, rtol=mode.rtol)

    t, d = reference_probs(mode.cast(logits_per_target), every_target)
    expected = reference_ap(t, d, np.eye(WINDOW)[-1], np.ones(WINDOW))
    np.testing.assert_allclose(nll, expected, rtol=mode.rtol)


def test_expected_pauses_values(mode):
    probs = mode.cast([[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    with np.errstate(divide="ignore"):
        pauses = mode.run(losses.expected_pauses, np.log(probs))
    np.testing.assert_allclose(pauses, [2.0, 0.0, 3.0], rtol=mode.rtol, atol=mode.rtol)


def test_va_matches_numpy_formula(mode):
    logits, targets = random_logits(np.random.default_rng(15))
    discount = losses.discount_schedule(0.8, WINDOW, "linear")
    cases = [("1:1:1:1", 1.0), ("1:2:3:4", 0.3), ("5:1:1:0.5", 0.0)]

    def every_case(logits):
        lp = lp_from_logits(logits, targets)
        return [
            losses.cyb_va(lp, prior=prior, discount=discount, beta=beta) for prior, beta in cases
        ]

    t, d = reference_probs(mode.cast(logits), targets)
    for loss, (prior, beta) in zip(mode.run(every_case, mode.cast(logits)), cases):
        expected = reference_va(t, d, ratios(prior), discount, beta)
        np.testing.assert_allclose(loss, expected, rtol=mode.rtol, err_msg=prior)


VA_LOGITS, VA_TARGETS = random_logits(np.random.default_rng(16), batch=1)
VA_PRIOR = np.array([0.2, 0.5, 0.1, 0.2])
VA_DISCOUNT = np.array([1.0, 0.9, 0.8, 0.7])


def va_loss_and_stopping(dk_logits):
    """Return ℓ_VA and log s of the test window as functions of the DK logits of steps 0..W-2."""
    logits = jnp.asarray(VA_LOGITS, dk_logits.dtype).at[0, :-1, -1].set(dk_logits)
    lp = lp_from_logits(logits, VA_TARGETS)
    loss = losses.cyb_va(lp, prior=VA_PRIOR, discount=VA_DISCOUNT)[0]
    return loss, losses.stopping_distribution(lp)[0]


@functools.cache
def va_optimal_dk_logits():
    """Minimise ℓ_VA over the DK logits with BFGS, jitted and in float64.

    Every mode shares this result, because float32 gradients stall the minimiser early.
    """
    with jax.enable_x64(True):
        value_and_grad = jax.jit(jax.value_and_grad(va_loss_and_stopping, has_aux=True))

        def objective(dk_logits):
            (loss, _), grad = value_and_grad(dk_logits)
            return float(loss), np.asarray(grad)

        result = scipy.optimize.minimize(
            objective, np.zeros(WINDOW - 1), jac=True, method="BFGS", options={"gtol": 1e-9}
        )
    return result.x


def test_va_optimum_is_posterior_over_steps(mode):
    (loss, log_stop), grad = mode.run(
        jax.value_and_grad(va_loss_and_stopping, has_aux=True), mode.cast(va_optimal_dk_logits())
    )

    t, _ = reference_probs(VA_LOGITS, VA_TARGETS)
    weights = VA_PRIOR * VA_DISCOUNT * t[0]
    # The minimiser stops about 1e-9 from the optimum, so float64 checks get a looser tolerance.
    tolerance = max(10 * mode.rtol, 1e-7)
    np.testing.assert_allclose(np.exp(log_stop), weights / weights.sum(), rtol=tolerance)
    np.testing.assert_allclose(loss, -np.log(weights.sum()), rtol=mode.rtol)
    np.testing.assert_allclose(grad, 0.0, atol=tolerance)


def test_dp_matches_numpy_formula_with_zero_prior(mode):
    logits, targets = random_logits(np.random.default_rng(17))
    cases = [
        ("0:0:0:1", 0.1, np.ones(WINDOW)),
        ("0:1:0:1", 0.01, np.array([1.0, 0.0, 0.6, 0.0])),
        ("1:1:1:1", 0.5, losses.discount_schedule(0.5, WINDOW, "exponential")),
    ]

    def every_case(logits):
        lp = lp_from_logits(logits, targets)
        return [
            losses.cyb_dp(lp, prior=prior, alpha=alpha, discount=discount)
            for prior, alpha, discount in cases
        ]

    t, d = reference_probs(mode.cast(logits), targets)
    for loss, (prior, alpha, discount) in zip(mode.run(every_case, mode.cast(logits)), cases):
        expected = reference_dp(t, d, ratios(prior), alpha, discount)
        np.testing.assert_allclose(loss, expected, rtol=mode.rtol, err_msg=prior)


# ---------------------------------------------------------------------------
# Extreme inputs, batching and tracing

EXTREME_LOSSES = {
    "ce": losses.cross_entropy,
    "pause_ce": losses.pause_cross_entropy,
    "mixture": losses.mixture_nll,
    "ap": functools.partial(losses.cyb_ap, world_stop="0:3:0:1", discount=[0.0, 1.0, 0.5, 0.0]),
    "va": functools.partial(losses.cyb_va, prior="1:2:1:4", discount=[1.0, 0.5, 0.2, 0.1]),
    "dp": functools.partial(losses.cyb_dp, prior="0:1:0:2", alpha=0.1, discount=[0, 1, 0, 1]),
    "expected_pauses": lambda lp: losses.expected_pauses(
        losses.stopping_distribution(lp, "0:1:0:1")
    ),
}


def extreme_logits(rng):
    """Return logits and targets that drive d and t to 0 or 1, with ±1e4 logits."""
    logits, targets = random_logits(rng)
    logits[0, :, -1] = 1e4  # d = 1 at every step
    logits[1, :, -1] = -1e4  # d = 0 at every step
    logits[2, :, :-1] = -1e4  # d = 1 and t = 1/V
    logits[3, np.arange(WINDOW), targets[3]] = -1e4  # t = 0
    logits[4:] = rng.choice([-1e4, -3.0, 0.0, 1e4], size=logits[4:].shape)
    targets[5] = -1  # a padding position: arbitrary logits and an invalid target
    return logits, targets


def values_and_grads(loss_fns, *arrays):
    """Return {name: (loss values, gradients w.r.t. every input array)} for each loss."""
    results = {}
    for name, loss_fn in loss_fns.items():
        values, vjp = jax.vjp(loss_fn, *arrays)
        results[name] = (values, vjp(jnp.ones_like(values)))
    return results


def test_losses_finite_at_extreme_logits(mode):
    logits, targets = extreme_logits(np.random.default_rng(18))
    loss_fns = {
        name: lambda x, loss_fn=loss_fn: loss_fn(lp_from_logits(x, targets))
        for name, loss_fn in EXTREME_LOSSES.items()
    }
    results = mode.run(functools.partial(values_and_grads, loss_fns), mode.cast(logits))
    for name, (values, (grads,)) in results.items():
        assert np.all(np.isfinite(values)), name
        assert np.all(np.isfinite(grads)), name
        assert np.any(grads != 0), name


def test_losses_finite_at_exact_certain_decisions(mode):
    rng = np.random.default_rng(19)
    log_t = np.log(rng.uniform(0.1, 0.9, size=(BATCH, WINDOW)))
    d = np.array(
        [
            [1.0, 1.0, 1.0, 1.0],
            [0.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 1.0, 0.0],
            [0.0, 1.0, 1.0, 1.0],
            [1.0, 1.0, 0.0, 0.5],
            [0.5, 0.0, 1.0, 1.0],
        ]
    )
    with np.errstate(divide="ignore"):
        log_d, log_answer = np.log(d), np.log1p(-d)
    # dp is left out: its KL(ρ ‖ s) is rightly infinite where ρ_i > 0 and s_i = 0.
    loss_fns = {
        name: lambda *arrays, loss_fn=EXTREME_LOSSES[name]: loss_fn(losses.StepLogProbs(*arrays))
        for name in ("mixture", "va", "expected_pauses")
    }

    args = [mode.cast(array) for array in (log_t, log_d, log_answer)]
    results = mode.run(functools.partial(values_and_grads, loss_fns), *args)
    for name, (values, grads) in results.items():
        assert np.all(np.isfinite(values)), name
        for grad in grads:
            assert np.all(np.isfinite(grad)), name


@pytest.mark.parametrize("name", ["ap", "va", "dp", "mixture"])
def test_losses_accept_any_batch_shape(name):
    logits, targets = random_logits(np.random.default_rng(20))
    lp = lp_from_logits(logits.reshape(2, 3, WINDOW, VOCAB + 1), targets.reshape(2, 3))
    loss_fn = EXTREME_LOSSES[name]
    batched = np.asarray(loss_fn(lp))
    assert batched.shape == (2, 3)

    single = np.asarray(loss_fn(jax.tree.map(lambda a: a[1, 2], lp)))
    vmapped = np.asarray(jax.vmap(jax.vmap(loss_fn))(lp))
    assert single.shape == ()
    np.testing.assert_allclose(single, batched[1, 2], rtol=1e-6)
    np.testing.assert_allclose(vmapped, batched, rtol=1e-6)


def test_losses_compute_bfloat16_input_in_float32():
    logits, targets = random_logits(np.random.default_rng(21))
    lp = jax.tree.map(lambda a: a.astype(jnp.bfloat16), lp_from_logits(logits, targets))
    assert losses.mixture_nll(lp).dtype == jnp.float32
    assert losses.cyb_va(lp, prior="1:1:1:1").dtype == jnp.float32


@pytest.mark.parametrize(
    "fn",
    [
        functools.partial(losses.cyb_ap, world_stop="1:1:1:1", discount=None),
        functools.partial(losses.cyb_va, prior="1:1:1:1"),
        functools.partial(losses.cyb_dp, prior="0:0:1:1", alpha=0.1),
        losses.stopping_distribution,
    ],
    ids=["ap", "va", "dp", "stopping_distribution"],
)
def test_losses_scan_along_pause_axis(fn):
    lp = lp_from_logits(*random_logits(np.random.default_rng(22)))
    jaxpr = jax.make_jaxpr(fn)(lp)
    primitives = {equation.primitive.name for equation in jaxpr.jaxpr.eqns}
    assert "scan" in primitives


# ---------------------------------------------------------------------------
# Hyper-parameters and validation


def test_discount_schedule_values():
    np.testing.assert_allclose(losses.discount_schedule(1.0, 4, "constant"), [1, 1, 1, 1])
    np.testing.assert_allclose(losses.discount_schedule(0.9, 4, "linear"), [1, 0.9, 0.8, 0.7])
    np.testing.assert_allclose(
        losses.discount_schedule(0.5, 4, "exponential"), [1, 0.5, 0.25, 0.125]
    )
    np.testing.assert_array_equal(losses.discount_schedule(2 / 3, 4, "linear")[-1], 0.0)
    np.testing.assert_allclose(losses.discount_schedule(0.0, 3, "exponential"), [1, 0, 0])
    np.testing.assert_allclose(losses.discount_schedule(0.0, 1, "linear"), [1])


@pytest.mark.parametrize(
    "gamma0, window, kind, message",
    [
        (0.9, 4, "cosine", "discount_kind must be one of constant, linear, exponential"),
        (1.5, 4, "exponential", r"gamma0 must be in \[0, 1\], got 1.5"),
        (-0.1, 4, "linear", r"gamma0 must be in \[0, 1\]"),
        (0.5, 4, "linear", "negative at step 3"),
        (0.9, 4, "constant", "no effect with discount_kind='constant'"),
        (0.9, 0, "linear", "window must be a positive integer"),
    ],
)
def test_discount_schedule_rejects_bad_input(gamma0, window, kind, message):
    with pytest.raises(ValueError, match=message):
        losses.discount_schedule(gamma0, window, kind)


@pytest.mark.parametrize(
    "ratios", ["0:1:0:3", [0, 1, 0, 3], (0.0, 1.0, 0.0, 3.0), np.array([0, 1, 0, 3]), " 0 : 1:0:3"]
)
def test_parse_ratios_accepts_strings_and_sequences(ratios):
    parsed = losses.parse_ratios(ratios, 4, "world_stop")
    np.testing.assert_allclose(parsed, [0, 0.25, 0, 0.75])
    assert parsed.dtype == np.float64


@pytest.mark.parametrize(
    "ratios, message",
    [
        (
            (0, 0, 1),
            r"world_stop must have 4 entries, one per pause step \(window=4\), got 3: \(0, 0, 1\)",
        ),
        ("0:0:1", r"world_stop must have 4 entries.*got 3"),
        ((0, -1, 1, 1), r"world_stop must be non-negative, got \(0, -1, 1, 1\)"),
        ("0:0:0:0", "world_stop must have a positive total"),
        ((0, np.inf, 0, 1), "world_stop must be finite"),
        ((0, np.nan, 0, 1), "world_stop must be finite"),
        ("0:zero:0:1", "world_stop must be numbers separated by ':'"),
        ([[0, 1], [0, 1]], "world_stop must be one-dimensional"),
        (["a", "b", "c", "d"], "world_stop must be a sequence of numbers"),
    ],
)
def test_parse_ratios_rejects_invalid_distributions(ratios, message):
    with pytest.raises(ValueError, match=message):
        losses.parse_ratios(ratios, 4, "world_stop")


@pytest.mark.parametrize(
    "loss_fn, kwargs, message",
    [
        (losses.cyb_ap, {"world_stop": "0:1", "discount": None}, "world_stop must have 4"),
        (
            losses.cyb_ap,
            {"world_stop": "1:1:1:1", "discount": [1, 1, 2, 1]},
            r"discount must be in \[0, 1\] at every step, got \(1, 1, 2, 1\)",
        ),
        (losses.cyb_ap, {"world_stop": "1:1:1:1", "discount": [1, 1]}, "discount must have 4"),
        (
            losses.cyb_ap,
            {"world_stop": "1:1:0:0", "discount": [0, 0, 1, 1]},
            r"discount is 0 at every step where the model can stop \(steps 0..1",
        ),
        (losses.cyb_va, {"prior": "1:-1:1:1"}, "prior must be non-negative"),
        (losses.cyb_va, {"prior": "0:1:1:1"}, "prior must be positive at every step"),
        (
            losses.cyb_va,
            {"prior": "1:1:1:1", "discount": [1, 1, 1, 0]},
            "discount must be positive",
        ),
        (losses.cyb_va, {"prior": "1:1:1:1", "beta": -1.0}, "beta must be a finite, non-negative"),
        (losses.cyb_dp, {"prior": "0:0:0:0", "alpha": 0.1}, "prior must have a positive total"),
        (losses.cyb_dp, {"prior": "1:1:1:1", "alpha": float("nan")}, "alpha must be a finite"),
        (losses.cyb_dp, {"prior": "1:1:1:1", "alpha": 0.1, "discount": [0] * 4}, "discount is 0"),
        (losses.stopping_distribution, {"world_stop": "1:1:1"}, "world_stop must have 4"),
    ],
)
def test_losses_reject_invalid_hyperparameters(loss_fn, kwargs, message):
    lp = lp_from_logits(*random_logits(np.random.default_rng(23)))
    with pytest.raises(ValueError, match=message):
        loss_fn(lp, **kwargs)


def test_losses_reject_traced_hyperparameters():
    lp = lp_from_logits(*random_logits(np.random.default_rng(24)))
    with pytest.raises(ValueError, match="world_stop must be concrete"):
        jax.jit(lambda world: losses.cyb_ap(lp, world_stop=world, discount=None))(jnp.ones(4))
    with pytest.raises(ValueError, match="alpha must be a concrete"):
        jax.jit(lambda alpha: losses.cyb_dp(lp, prior="1:1:1:1", alpha=alpha))(0.1)


# ---------------------------------------------------------------------------
# Registry


def test_make_loss_matches_direct_calls(mode):
    logits, targets = random_logits(np.random.default_rng(25))
    lp = lp_from_logits(mode.cast(logits), targets)
    discount = losses.discount_schedule(0.9, 4, "exponential")
    cases = [
        ("ce", {}, losses.cross_entropy(lp)),
        ("pause_ce", {}, losses.pause_cross_entropy(lp)),
        ("ap", {}, losses.mixture_nll(lp)),
        (
            "ap",
            {"world_stop": "0:1:1:1", "gamma": 0.9, "discount_kind": "exponential"},
            losses.cyb_ap(lp, world_stop="0:1:1:1", discount=discount),
        ),
        ("va", {"prior": "1:2:2:1", "beta": 0.5}, losses.cyb_va(lp, prior="1:2:2:1", beta=0.5)),
        (
            "dp",
            {
                "prior": "0:0:1:1",
                "alpha": 0.1,
                "gamma": 0.9,
                "discount_kind": "exponential",
                "world_stop": "0:0:0:1",
            },
            losses.cyb_dp(lp, prior="0:0:1:1", alpha=0.1, discount=discount),
        ),
    ]
    loss_fns = [losses.make_loss(name, window=4, **kwargs) for name, kwargs, _ in cases]
    values = mode.run(lambda lp: [loss_fn(lp) for loss_fn in loss_fns], lp)
    for value, loss_fn, (name, _, expected) in zip(values, loss_fns, cases):
        assert losses.LOSSES[name] in (loss_fn, getattr(loss_fn, "func", None))
        np.testing.assert_allclose(value, expected, rtol=mode.rtol, err_msg=name)


def test_make_loss_rejects_unknown_name():
    with pytest.raises(
        ValueError, match="unknown loss name 'cyb'. Known names: ce, pause_ce, ap, va, dp"
    ):
        losses.make_loss("cyb", window=4)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("va", {}, "needs prior"),
        ("dp", {"alpha": 0.1}, "needs prior"),
        ("dp", {"prior": "1:1:1:1"}, "needs alpha"),
        ("va", {"prior": "0:1:1:1"}, "prior must be positive at every step"),
        (
            "va",
            {"prior": "1:1:1:1", "gamma": 2 / 3, "discount_kind": "linear"},
            "discount must be positive",
        ),
        ("ap", {"world_stop": "1:1"}, "world_stop must have 4"),
        ("ap", {"gamma": 0.5, "discount_kind": "linear"}, "gamma=0.5 with discount_kind='linear'"),
        ("ap", {"gamma": 0.9}, "gamma=0.9 has no effect"),
        ("ap", {"prior": "1:1:1:1"}, "prior has no effect on the 'ap' loss, only on 'va', 'dp'"),
        (
            "va",
            {"prior": "1:1:1:1", "world_stop": "1:1:1:1"},
            "world_stop has no effect on the 'va'",
        ),
        (
            "pause_ce",
            {"gamma": 0.9, "discount_kind": "exponential"},
            "gamma has no effect on the 'pause_ce' loss",
        ),
        ("ap", {"alpha": 0.1}, "alpha has no effect on the 'ap' loss, only on 'dp'"),
        (
            "dp",
            {"prior": "1:1:1:1", "alpha": 0.1, "beta": 0.5},
            "beta has no effect on the 'dp' loss",
        ),
        ("dp", {"prior": "1:1:1:1", "alpha": -1.0}, "alpha must be a finite, non-negative"),
        ("ce", {"window": 0}, "window must be a positive integer"),
    ],
)
def test_make_loss_rejects_invalid_hyperparameters(name, kwargs, message):
    kwargs = {"window": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        losses.make_loss(name, **kwargs)
