"""Tests of the pause-slot transformer: causality, packing, step-0 equivalence, DK prior."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cyb_jax import attention
from cyb_jax import model

VOCAB = 50
LENGTH = 6


def _config(window, visibility="visible", **overrides):
    settings = dict(
        vocab_size=VOCAB,
        window=window,
        num_layers=2,
        d_model=32,
        num_heads=2,
        mlp_dim=48,
        pause_visibility=visibility,
        vocab_multiple=64,
    )
    settings.update(overrides)
    return model.TransformerConfig(**settings)


def _inputs(segments=None):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, VOCAB, size=(1, LENGTH)), jnp.int32)
    segments = (
        jnp.ones((1, LENGTH), jnp.int32) if segments is None else jnp.asarray([segments], jnp.int32)
    )
    positions = np.zeros((1, LENGTH), np.int32)
    for n in range(1, LENGTH):
        same = segments[0, n] == segments[0, n - 1]
        positions[0, n] = positions[0, n - 1] + 1 if same else 0
    return tokens, jnp.asarray(positions), segments


def _init(config, tokens, positions, segments):
    variables = model.Transformer(config).init(jax.random.key(1), tokens, positions, segments)
    return nn.meta.unbox(variables["params"])


def _dependence(config, segments=None):
    """Return D[q, k]: whether the output logits at slot q depend on the input at slot k."""
    tokens, positions, segments = _inputs(segments)
    params = _init(config, tokens, positions, segments)
    net = model.Transformer(config)
    slots = LENGTH * config.window
    zeros = {"slots": jnp.zeros((1, slots, config.d_model))}

    def output_at(perturbations, query):
        logits = net.apply(
            {"params": params, "perturbations": perturbations}, tokens, positions, segments
        )
        return jnp.sum(logits.reshape(slots, -1)[query] * jnp.linspace(1.0, 2.0, logits.shape[-1]))

    dependence = np.zeros((slots, slots), bool)
    for query in range(slots):
        grad = jax.grad(output_at)(zeros, query)["slots"][0]
        dependence[query] = np.abs(np.asarray(grad)).sum(-1) > 0
    return dependence


def _allowed(window, visibility, segments=None):
    segments = [1] * LENGTH if segments is None else segments
    slots = [(n, i) for n in range(LENGTH) for i in range(window)]
    allowed = np.zeros((len(slots), len(slots)), bool)
    for (q, (n, i)), (k, (m, j)) in itertools.product(enumerate(slots), enumerate(slots)):
        if segments[n] != segments[m]:
            continue
        if visibility == "visible":
            allowed[q, k] = m < n or (m == n and j <= i)
        else:
            allowed[q, k] = (j == 0 and m <= n) or (m == n and j <= i)
    return allowed


@pytest.mark.parametrize("visibility", ["visible", "private"])
def test_causality_through_gradients(visibility):
    dependence = _dependence(_config(3, visibility))
    allowed = _allowed(3, visibility)
    assert not np.any(dependence & ~allowed), "an output depends on a slot it must not see"
    # Every slot depends on its own input, and the last slot of the last token on the first token.
    assert np.all(np.diag(dependence))
    assert dependence[-1, 0]


def test_private_pause_sees_only_own_earlier_pauses():
    window = 3
    dependence = _dependence(_config(window, "private"))
    for n in range(LENGTH):
        for m in range(LENGTH):
            if m != n:
                for i, j in itertools.product(range(window), range(1, window)):
                    assert not dependence[n * window + i, m * window + j], (n, i, m, j)


@pytest.mark.parametrize("visibility", ["visible", "private"])
def test_packed_segments_do_not_see_each_other(visibility):
    segments = [1, 1, 1, 2, 2, 2]
    dependence = _dependence(_config(2, visibility), segments)
    allowed = _allowed(2, visibility, segments)
    assert not np.any(dependence & ~allowed)
    second_segment_first_slot = 3 * 2
    assert not np.any(dependence[second_segment_first_slot:, :second_segment_first_slot])


def test_attention_mask_matches_rule():
    segments = [1, 1, 2, 2, 2, 3]
    for window, visibility in itertools.product([1, 2, 4], attention.VISIBILITY_MODES):
        layout = attention.slot_layout(jnp.asarray([segments], jnp.int32), window)
        mask = np.asarray(attention.attention_mask(layout, visibility))[0, 0]
        np.testing.assert_array_equal(mask, _allowed(window, visibility, segments))


def test_reference_attention_matches_numpy():
    rng = np.random.default_rng(2)
    query, key, value = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    mask = rng.random((2, 1, 5, 5)) < 0.6
    mask |= np.eye(5, dtype=bool)[None, None]
    out = attention.reference_attention(query, key, value, jnp.asarray(mask))
    scores = np.einsum("bqhk,bshk->bhqs", query, key) / 2.0
    scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqs,bshk->bqhk", weights, value)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_private_step0_equals_no_pause_model():
    tokens, positions, segments = _inputs([1, 1, 1, 1, 2, 2])
    pause_config = _config(4, "private")
    plain_config = _config(1, "private")
    assert pause_config.padded_vocab_size == plain_config.padded_vocab_size
    params = _init(pause_config, tokens, positions, segments)
    with_pauses = model.Transformer(pause_config).apply(
        {"params": params}, tokens, positions, segments
    )
    without = model.Transformer(plain_config).apply({"params": params}, tokens, positions, segments)
    np.testing.assert_allclose(
        np.asarray(with_pauses[:, :, 0]), np.asarray(without[:, :, 0]), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(np.asarray(with_pauses[:, :, 1]), np.asarray(with_pauses[:, :, 0]))


def test_visible_step0_differs_from_no_pause_model():
    tokens, positions, segments = _inputs()
    params = _init(_config(2), tokens, positions, segments)
    with_pauses = model.Transformer(_config(2)).apply(
        {"params": params}, tokens, positions, segments
    )
    without = model.Transformer(_config(1)).apply({"params": params}, tokens, positions, segments)
    # The first token has no earlier pause to see, later ones do.
    np.testing.assert_allclose(
        np.asarray(with_pauses[:, 0, 0]), np.asarray(without[:, 0, 0]), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(
        np.asarray(with_pauses[:, 1:, 0]), np.asarray(without[:, 1:, 0]), atol=1e-4
    )


def test_pause_slots_share_token_position():
    tokens, positions, segments = _inputs()
    config = _config(3, "private")
    params = _init(config, tokens, positions, segments)
    net = model.Transformer(config)
    base = net.apply({"params": params}, tokens, positions, segments)
    # Shifting every position by the same amount leaves RoPE attention unchanged.
    shifted = net.apply({"params": params}, tokens, positions + 7, segments)
    np.testing.assert_allclose(np.asarray(base), np.asarray(shifted), rtol=1e-4, atol=1e-4)
    # Moving the pauses to other positions than their token's would change the outputs.
    rotated = model.apply_rope(jnp.ones((1, 2, 1, 4)), jnp.asarray([[0, 1]]), 10_000.0)
    assert not np.allclose(np.asarray(rotated[0, 0]), np.asarray(rotated[0, 1]))


def test_output_has_dk_last_and_dk_prior_offset():
    tokens, positions, segments = _inputs()
    config = _config(2, dk_prior=0.9)
    params = _init(config, tokens, positions, segments)
    params["head"]["kernel"] = jnp.zeros_like(params["head"]["kernel"])
    logits = model.Transformer(config).apply({"params": params}, tokens, positions, segments)
    assert logits.shape == (1, LENGTH, 2, VOCAB + 1)
    dk_probability = jax.nn.softmax(logits, axis=-1)[..., config.dk_id]
    np.testing.assert_allclose(np.asarray(dk_probability), 0.9, rtol=1e-5)
    no_prior = _config(2)
    assert no_prior.dk_offset == 0.0


def test_pause_codes_are_distinct_embeddings():
    config = _config(4)
    assert config.padded_vocab_size % config.vocab_multiple == 0
    assert config.padded_vocab_size >= VOCAB + 1 + 3
    tokens, positions, segments = _inputs()
    params = _init(config, tokens, positions, segments)
    table = np.asarray(params["embedding"])
    codes = table[VOCAB + 1 : VOCAB + 4]
    assert len({row.tobytes() for row in codes}) == 3
