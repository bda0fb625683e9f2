"""Tests of the fast attention kernels against the dense masked reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cyb_jax import attention
from cyb_jax import model

HEADS = 2
HEAD_DIM = 4
# Row 0 packs three segments, row 1 is one segment.
SEGMENTS = [[1, 1, 1, 2, 2, 3, 3], [4, 4, 4, 4, 4, 4, 4]]
LENGTH = len(SEGMENTS[0])
RTOL = 1e-5
ATOL = 1e-5


def _layout(window, with_present, seed=0):
    segment_ids = jnp.asarray(SEGMENTS, jnp.int32)
    granted_steps = None
    if with_present:
        rng = np.random.default_rng(seed)
        # 0 leaves even the step-0 slot out, which the kernels must handle too.
        granted = rng.integers(0, window + 1, size=segment_ids.shape)
        granted[0, :2] = [0, window]
        granted_steps = jnp.asarray(granted, jnp.int32)
    return attention.slot_layout(segment_ids, window, granted_steps)


def _query_key_value(window, seed=1, scale=1.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shape = (len(SEGMENTS), LENGTH * window, HEADS, HEAD_DIM)
    return tuple(jnp.asarray(scale * rng.normal(size=shape), dtype) for _ in range(3))


def _kernel(visibility, layout, window):
    if visibility == "private":
        return lambda q, k, v: attention.private_attention(q, k, v, layout, window)
    return lambda q, k, v: attention.visible_attention(q, k, v, layout)


def _reference(visibility, layout):
    mask = attention.attention_mask(layout, visibility)
    return lambda q, k, v: attention.reference_attention(q, k, v, mask)


def _values_and_gradients(function, query, key, value, cotangent):
    def loss(q, k, v):
        return jnp.sum(function(q, k, v).astype(jnp.float32) * cotangent)

    out = function(query, key, value)
    gradients = jax.grad(loss, argnums=(0, 1, 2))(query, key, value)
    return out, gradients


def _assert_kernel_matches_reference(
    visibility, window, with_present, scale=1.0, rtol=RTOL, atol=ATOL
):
    layout = _layout(window, with_present)
    query, key, value = _query_key_value(window, scale=scale)
    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=query.shape), jnp.float32)
    out, gradients = _values_and_gradients(
        _kernel(visibility, layout, window), query, key, value, cotangent
    )
    expected, expected_gradients = _values_and_gradients(
        _reference(visibility, layout), query, key, value, cotangent
    )
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=rtol, atol=atol)
    for name, gradient, expected_gradient in zip(
        ("query", "key", "value"), gradients, expected_gradients
    ):
        assert np.all(np.isfinite(np.asarray(gradient))), name
        np.testing.assert_allclose(
            np.asarray(gradient),
            np.asarray(expected_gradient),
            rtol=rtol,
            atol=atol,
            err_msg=f"gradient with respect to {name}",
        )


@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_private_matches_reference(window, with_present):
    _assert_kernel_matches_reference("private", window, with_present)


@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_visible_matches_reference(window, with_present):
    _assert_kernel_matches_reference("visible", window, with_present)


@pytest.mark.parametrize("visibility", attention.VISIBILITY_MODES)
def test_kernels_stable_for_large_scores(visibility):
    # Scores of order 100 overflow exp() in float32 unless the max is subtracted
    # first. Their rounding errors, of order 1e-5, grow by |key| / sqrt(K), about 10,
    # in the query gradient, whose entries reach 100 here.
    _assert_kernel_matches_reference(
        visibility, 4, with_present=True, scale=10.0, rtol=1e-4, atol=1e-3
    )


def test_private_matches_reference_in_bfloat16():
    window = 4
    layout = _layout(window, with_present=True)
    query, key, value = _query_key_value(window, dtype=jnp.bfloat16)
    out = attention.private_attention(query, key, value, layout, window)
    expected = _reference("private", layout)(query, key, value)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), rtol=2e-2, atol=2e-2
    )


def _largest_intermediate_size(jaxpr) -> int:
    """Return the element count of the largest value any equation of `jaxpr` creates."""
    largest = 0
    for equation in jaxpr.eqns:
        for variable in equation.outvars:
            largest = max(largest, int(np.prod(getattr(variable.aval, "shape", ()))))
        for parameter in equation.params.values():
            for inner in parameter if isinstance(parameter, (list, tuple)) else [parameter]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_intermediate_size(inner))
    return largest


def test_private_forms_no_slot_by_slot_array():
    window = 4
    layout = _layout(window, with_present=True)
    query, key, value = _query_key_value(window)
    batch, slots = query.shape[:2]

    def loss(q, k, v):
        return jnp.sum(attention.private_attention(q, k, v, layout, window))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(query, key, value).jaxpr
    # The real-key scores [B, H, L, W, L] are the largest array, W times smaller than
    # the [B, H, S, S] scores of the reference.
    assert _largest_intermediate_size(jaxpr) == batch * HEADS * slots * LENGTH
    reference_jaxpr = jax.make_jaxpr(lambda q, k, v: _reference("private", layout)(q, k, v).sum())(
        query, key, value
    ).jaxpr
    assert _largest_intermediate_size(reference_jaxpr) == batch * HEADS * slots * slots


def test_slot_attention_dispatches_by_visibility():
    window = 2
    layout = _layout(window, with_present=False)
    query, key, value = _query_key_value(window)
    for visibility in attention.VISIBILITY_MODES:
        fused = attention.slot_attention(query, key, value, layout, window, visibility, "fused")
        reference = attention.slot_attention(
            query, key, value, layout, window, visibility, "reference"
        )
        np.testing.assert_allclose(
            np.asarray(fused), np.asarray(reference), rtol=RTOL, atol=ATOL, err_msg=visibility
        )


def test_slot_attention_rejects_unknown_names():
    window = 2
    layout = _layout(window, with_present=False)
    query, key, value = _query_key_value(window)
    with pytest.raises(ValueError, match="implementation 'flash'"):
        attention.slot_attention(query, key, value, layout, window, "private", "flash")
    with pytest.raises(ValueError, match="visibility 'hidden'"):
        attention.slot_attention(query, key, value, layout, window, "hidden")


def test_private_rejects_window_not_dividing_slots():
    layout = _layout(2, with_present=False)
    query, key, value = _query_key_value(2)
    with pytest.raises(ValueError, match="not a multiple of the window 3"):
        attention.private_attention(query, key, value, layout, 3)


def _transformer_config(visibility, implementation, window=3):
    return model.TransformerConfig(
        vocab_size=50,
        window=window,
        num_layers=2,
        d_model=32,
        num_heads=HEADS,
        mlp_dim=48,
        pause_visibility=visibility,
        attention=implementation,
        vocab_multiple=64,
    )


@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("visibility", attention.VISIBILITY_MODES)
def test_transformer_fused_matches_reference(visibility, with_present):
    rng = np.random.default_rng(3)
    window = 3
    tokens = jnp.asarray(rng.integers(0, 50, size=(2, LENGTH)), jnp.int32)
    segments = jnp.asarray(SEGMENTS, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), (2, LENGTH))
    granted = None
    if with_present:
        granted = jnp.asarray(rng.integers(1, window + 1, size=(2, LENGTH)), jnp.int32)
    fused = model.Transformer(_transformer_config(visibility, "fused", window))
    reference = model.Transformer(_transformer_config(visibility, "reference", window))
    variables = fused.init(jax.random.key(0), tokens, positions, segments, granted)
    params = nn.meta.unbox(variables["params"])
    weights = jnp.asarray(rng.normal(size=(2, LENGTH, window, 51)), jnp.float32)

    def loss(params, net):
        logits = net.apply({"params": params}, tokens, positions, segments, granted)
        return jnp.sum(logits * weights), logits

    (_, logits), gradients = jax.value_and_grad(loss, has_aux=True)(params, fused)
    (_, expected_logits), expected_gradients = jax.value_and_grad(loss, has_aux=True)(
        params, reference
    )
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(expected_logits), rtol=RTOL, atol=1e-4
    )
    flat_gradients = jax.tree_util.tree_leaves_with_path(gradients)
    flat_expected = jax.tree_util.tree_leaves(expected_gradients)
    for (path, gradient), expected_gradient in zip(flat_gradients, flat_expected):
        np.testing.assert_allclose(
            np.asarray(gradient),
            np.asarray(expected_gradient),
            rtol=1e-4,
            atol=1e-4,
            err_msg=jax.tree_util.keystr(path),
        )
