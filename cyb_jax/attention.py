"""Pause-aware attention: slot layout, visibility masks and the reference kernel.

Every real token n owns W slots (n, 0), ..., (n, W-1), flattened token-major into
S = L * W slots. Two visibility modes decide which slots a query may read:

- 'visible': pauses are ordinary context. The flattened slots form one causal
    sequence, so slot (n, i) sees (m, j) when m < n, or m == n and j <= i.
- 'private': slot (n, i) sees the real slots (m, 0) with m <= n and its own
    token's slots (n, j) with j <= i. No later slot ever sees a pause, so step-0
    outputs equal those of the same weights run with W = 1.

In both modes a slot only sees slots of its own packed segment.

Kernels, all taking query, key and value [B, S, H, K] and returning [B, S, H, K]:

- `reference_attention`: the dense masked softmax over all S x S slot pairs, with
    the mask of `attention_mask`. It is obviously correct and costs O((L * W)^2)
    time and memory. The fast kernels are tested against it, and cached decoding
    uses it.
- `private_attention`: 'private' mode without any [S, S] array. Every query slot
    attends to the L real keys under a token-level causal and segment mask, giving
    scores [B, H, L, W, L], and separately to its own token's W pause keys, giving
    scores [B, H, L, W, W]. The two softmax parts are merged through their
    log-sum-exps, with max-subtracted float32 statistics. Time and memory are
    O(L^2 W + L W^2) per head, so about W times less than the reference.
- `visible_attention`: 'visible' mode through `jax.nn.dot_product_attention`
    with `is_causal=True` and a boolean [B, 1, S, S] mask of segments and absent
    slots. Its cost is that of the chosen JAX implementation.

`slot_attention` chooses between them by visibility mode and implementation
('fused' or 'reference', config `model.attention`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

VISIBILITY_MODES = ("visible", "private")


class SlotLayout(NamedTuple):
    """Per-slot indices of the flattened [B, S] sequence."""

    token: jax.Array  # index n of the slot's real token within the row, [B, S]
    step: jax.Array  # pause step i of the slot, 0 for the real token, [B, S]
    segment: jax.Array  # packed segment id of the slot's token, [B, S]
    # Whether the slot takes part, [B, S]; None when every slot does. Training recipe
    # 'sampled' grants a token fewer than W steps and leaves its later slots out.
    present: jax.Array | None = None


def slot_layout(
    segment_ids_BxL: jax.Array, window: int, granted_steps_BxL: jax.Array | None = None
) -> SlotLayout:
    """Lay out W slots per real token, token-major, with the token's segment.

    With `granted_steps_BxL`, slot (n, i) is present only when i < granted_steps[n].
    """
    batch, length = segment_ids_BxL.shape
    token_LxW = jnp.broadcast_to(jnp.arange(length)[:, None], (length, window))
    step_LxW = jnp.broadcast_to(jnp.arange(window)[None, :], (length, window))
    token_BxS = jnp.broadcast_to(token_LxW.reshape(-1), (batch, length * window))
    step_BxS = jnp.broadcast_to(step_LxW.reshape(-1), (batch, length * window))
    segment_BxS = jnp.repeat(segment_ids_BxL, window, axis=1)
    present_BxS = None
    if granted_steps_BxL is not None:
        present_BxS = step_BxS < jnp.repeat(granted_steps_BxL, window, axis=1)
    return SlotLayout(token=token_BxS, step=step_BxS, segment=segment_BxS, present=present_BxS)


def visibility_mask(
    query_token: jax.Array,
    query_step: jax.Array,
    key_token: jax.Array,
    key_step: jax.Array,
    visibility: str,
) -> jax.Array:
    """Return whether a query slot (token, step) may read a key slot, elementwise.

    The arguments broadcast against each other. Segments are not checked here.
    """
    own_token_earlier_step = (key_token == query_token) & (key_step <= query_step)
    if visibility == "visible":
        return (key_token < query_token) | own_token_earlier_step
    if visibility == "private":
        return ((key_step == 0) & (key_token <= query_token)) | own_token_earlier_step
    raise ValueError(
        f"Unknown pause visibility {visibility!r}; expected one of {VISIBILITY_MODES}."
    )


def attention_mask(layout: SlotLayout, visibility: str) -> jax.Array:
    """Return the boolean [B, 1, S, S] mask of which key slots each query slot sees.

    An absent slot (`layout.present` False) is seen by no other slot and sees only
    itself, so that its softmax row is not empty.
    """
    q_token = layout.token[:, :, None]
    k_token = layout.token[:, None, :]
    q_step = layout.step[:, :, None]
    k_step = layout.step[:, None, :]
    same_segment = layout.segment[:, :, None] == layout.segment[:, None, :]
    allowed = visibility_mask(q_token, q_step, k_token, k_step, visibility) & same_segment
    if layout.present is not None:
        both_present = layout.present[:, :, None] & layout.present[:, None, :]
        same_slot = (k_token == q_token) & (k_step == q_step)
        allowed = (allowed & both_present) | same_slot
    return allowed[:, None, :, :]


def reference_attention(
    query_BxSxHxK: jax.Array,
    key_BxSxHxK: jax.Array,
    value_BxSxHxK: jax.Array,
    mask_Bx1xSxS: jax.Array,
) -> jax.Array:
    """Dense masked softmax attention, with scores and softmax in float32."""
    head_dim = query_BxSxHxK.shape[-1]
    scores_BxHxSxS = jnp.einsum(
        "bqhk,bshk->bhqs",
        query_BxSxHxK.astype(jnp.float32),
        key_BxSxHxK.astype(jnp.float32),
    ) / jnp.sqrt(jnp.float32(head_dim))
    # Every slot sees at least itself, so no row is fully masked and the softmax
    # never divides by zero.
    scores_BxHxSxS = jnp.where(mask_Bx1xSxS, scores_BxHxSxS, jnp.finfo(jnp.float32).min)
    weights_BxHxSxS = jax.nn.softmax(scores_BxHxSxS, axis=-1)
    out_BxSxHxK = jnp.einsum("bhqs,bshk->bqhk", weights_BxHxSxS, value_BxSxHxK.astype(jnp.float32))
    return out_BxSxHxK.astype(value_BxSxHxK.dtype)


IMPLEMENTATIONS = ("fused", "reference")


def _masked_softmax_part(
    scores: jax.Array, mask: jax.Array, values: jax.Array, output_spec: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weight `values` by exp(score - row max) over the entries `mask` allows.

    Returns the unnormalised output, the row max of the allowed scores and the row
    sum of their exponentials, all float32. The part's log-sum-exp is max + log(sum).
    A row with no allowed entry gets max -inf and sum and output 0.
    """
    masked = jnp.where(mask, scores, -jnp.inf)
    # Shifting all scores of a row by a constant cancels between output and sum, so
    # the max needs no gradient.
    row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1))
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnormalised = jnp.exp(masked - shift[..., None])
    row_sum = jnp.sum(unnormalised, axis=-1)
    output = jnp.einsum(
        output_spec, unnormalised.astype(values.dtype), values, preferred_element_type=jnp.float32
    )
    return output, row_max, row_sum


def _heads_last(statistic_BxHxLxW: jax.Array) -> jax.Array:
    """Move the head axis of a per-query statistic to broadcast against [B, L, W, H, K]."""
    return statistic_BxHxLxW.transpose(0, 2, 3, 1)[..., None]


def private_attention(
    query_BxSxHxK: jax.Array,
    key_BxSxHxK: jax.Array,
    value_BxSxHxK: jax.Array,
    layout: SlotLayout,
    window: int,
) -> jax.Array:
    """Attend in 'private' mode without forming the [S, S] slot scores.

    Query, key and value are [B, S, H, K] with S = L * W slots in the token-major
    order of `slot_layout(segment_ids_BxL, window, ...)`, whose result is `layout`.
    The output is [B, S, H, K] in the value dtype and equals
    `reference_attention(query, key, value, attention_mask(layout, 'private'))`,
    absent slots included. Scores and softmax statistics are float32. The softmax
    weights enter the product with the values in the value dtype, which accumulates
    in float32.

    Slot (n, i) reads two parts, softmaxed separately and merged through their
    log-sum-exps:
      real: scores [B, H, L, W, L] against the step-0 keys (m, 0), m <= n, same segment;
      own:  scores [B, H, L, W, W] against its token's pauses (n, j), 1 <= j <= i.
    Step j = 0 belongs to the real part only. Cost is O(L^2 W + L W^2) per head.
    """
    batch, slots, heads, head_dim = query_BxSxHxK.shape
    if slots % window:
        raise ValueError(f"Slot count {slots} is not a multiple of the window {window}.")
    length = slots // window
    shape_BxLxWxHxK = (batch, length, window, heads, head_dim)
    scale = 1.0 / jnp.sqrt(jnp.float32(head_dim))
    query_BxLxWxHxK = query_BxSxHxK.reshape(shape_BxLxWxHxK)
    key_BxLxWxHxK = key_BxSxHxK.reshape(shape_BxLxWxHxK)
    value_BxLxWxHxK = value_BxSxHxK.reshape(shape_BxLxWxHxK)
    segment_BxL = layout.segment.reshape(batch, length, window)[:, :, 0]
    present_BxLxW = None
    if layout.present is not None:
        present_BxLxW = layout.present.reshape(batch, length, window)

    # Real part: every step of token n against the step-0 slots of tokens m <= n.
    tokens = jnp.arange(length)
    steps = jnp.arange(window)
    causal_LxL = tokens[:, None] >= tokens[None, :]
    same_segment_BxLxL = segment_BxL[:, :, None] == segment_BxL[:, None, :]
    real_mask_BxLxWxL = (causal_LxL[None] & same_segment_BxLxL)[:, :, None, :]
    if present_BxLxW is not None:
        key_present_BxL = present_BxLxW[:, :, 0]
        real_mask_BxLxWxL = (
            real_mask_BxLxWxL & present_BxLxW[:, :, :, None] & key_present_BxL[:, None, None, :]
        )
        # An absent step-0 slot still sees itself.
        own_slot_LxWxL = (steps[None, :, None] == 0) & (
            tokens[:, None, None] == tokens[None, None, :]
        )
        real_mask_BxLxWxL = real_mask_BxLxWxL | own_slot_LxWxL[None]
    real_scores_BxHxLxWxL = (
        jnp.einsum(
            "bnihk,bmhk->bhnim",
            query_BxLxWxHxK,
            key_BxLxWxHxK[:, :, 0],
            preferred_element_type=jnp.float32,
        )
        * scale
    )
    real_out_BxLxWxHxK, real_max_BxHxLxW, real_sum_BxHxLxW = _masked_softmax_part(
        real_scores_BxHxLxWxL,
        real_mask_BxLxWxL[:, None],
        value_BxLxWxHxK[:, :, 0],
        "bhnim,bmhk->bnihk",
    )
    if window == 1:
        out_BxLxWxHxK = real_out_BxLxWxHxK / _heads_last(real_sum_BxHxLxW)
        return out_BxLxWxHxK.reshape(query_BxSxHxK.shape).astype(value_BxSxHxK.dtype)

    # Own part: step i of token n against the pause steps 1 <= j <= i of token n.
    own_mask_WxW = (steps[None, :] >= 1) & (steps[None, :] <= steps[:, None])
    own_mask_BxLxWxW = jnp.broadcast_to(own_mask_WxW[None, None], (batch, length, window, window))
    if present_BxLxW is not None:
        own_mask_BxLxWxW = own_mask_BxLxWxW & (
            present_BxLxW[:, :, :, None] & present_BxLxW[:, :, None, :]
        )
        # An absent pause slot still sees itself.
        own_slot_WxW = jnp.eye(window, dtype=bool) & (steps[None, :] >= 1)
        own_mask_BxLxWxW = own_mask_BxLxWxW | own_slot_WxW[None, None]
    own_scores_BxHxLxWxW = (
        jnp.einsum(
            "bnihk,bnjhk->bhnij",
            query_BxLxWxHxK,
            key_BxLxWxHxK,
            preferred_element_type=jnp.float32,
        )
        * scale
    )
    own_out_BxLxWxHxK, own_max_BxHxLxW, own_sum_BxHxLxW = _masked_softmax_part(
        own_scores_BxHxLxWxW, own_mask_BxLxWxW[:, None], value_BxLxWxHxK, "bhnij,bnjhk->bnihk"
    )

    # Merge: rescale both parts to the larger of their maxima, which makes each
    # part's sum exp(part log-sum-exp - max). Every slot sees itself, so that max is
    # finite. Shifting by maxima rather than by log-sum-exps keeps the exponents
    # exact score differences, which matters when scores are large.
    max_BxHxLxW = jnp.maximum(real_max_BxHxLxW, own_max_BxHxLxW)
    real_scale_BxHxLxW = jnp.exp(real_max_BxHxLxW - max_BxHxLxW)
    own_scale_BxHxLxW = jnp.exp(own_max_BxHxLxW - max_BxHxLxW)
    total_BxHxLxW = real_scale_BxHxLxW * real_sum_BxHxLxW + own_scale_BxHxLxW * own_sum_BxHxLxW
    out_BxLxWxHxK = (
        _heads_last(real_scale_BxHxLxW) * real_out_BxLxWxHxK
        + _heads_last(own_scale_BxHxLxW) * own_out_BxLxWxHxK
    ) / _heads_last(total_BxHxLxW)
    return out_BxLxWxHxK.reshape(query_BxSxHxK.shape).astype(value_BxSxHxK.dtype)


def visible_attention(
    query_BxSxHxK: jax.Array,
    key_BxSxHxK: jax.Array,
    value_BxSxHxK: jax.Array,
    layout: SlotLayout,
    implementation: str | None = None,
) -> jax.Array:
    """Attend in 'visible' mode through `jax.nn.dot_product_attention`.

    Shapes and layout are as in `private_attention`, and the output equals
    `reference_attention(query, key, value, attention_mask(layout, 'visible'))`.
    The causal rule goes in as `is_causal=True`, which lets a fused kernel skip the
    blocks above the diagonal. Segments and absent slots go in as a boolean
    [B, 1, S, S] mask. `implementation` is passed on to JAX. With 'xla' the scores
    are dense. With 'cudnn' (GPU, float16 or bfloat16 only) cuDNN flash attention
    runs and adds the mask as a bias.
    """
    # NOTE: in jax 0.10.2, implementation=None always selects the XLA path, also on GPU.
    segment_BxS = layout.segment
    mask_BxSxS = segment_BxS[:, :, None] == segment_BxS[:, None, :]
    if layout.present is not None:
        both_present_BxSxS = layout.present[:, :, None] & layout.present[:, None, :]
        # An absent slot is seen by nobody and sees only itself.
        own_slot_SxS = jnp.eye(segment_BxS.shape[1], dtype=bool)
        mask_BxSxS = (mask_BxSxS & both_present_BxSxS) | own_slot_SxS[None]
    return jax.nn.dot_product_attention(
        query_BxSxHxK,
        key_BxSxHxK,
        value_BxSxHxK,
        mask=mask_BxSxS[:, None],
        is_causal=True,
        implementation=implementation,
    )


def slot_attention(
    query_BxSxHxK: jax.Array,
    key_BxSxHxK: jax.Array,
    value_BxSxHxK: jax.Array,
    layout: SlotLayout,
    window: int,
    visibility: str,
    implementation: str = "fused",
) -> jax.Array:
    """Attend over the slots of `layout` in `visibility` mode; returns [B, S, H, K].

    `implementation` 'fused' runs `private_attention` or `visible_attention`, and
    'reference' runs `reference_attention` on the dense `attention_mask`.
    """
    if implementation == "reference":
        mask_Bx1xSxS = attention_mask(layout, visibility)
        return reference_attention(query_BxSxHxK, key_BxSxHxK, value_BxSxHxK, mask_Bx1xSxS)
    if implementation != "fused":
        raise ValueError(
            f"Unknown attention implementation {implementation!r}; "
            f"expected one of {IMPLEMENTATIONS}."
        )
    if visibility == "private":
        return private_attention(query_BxSxHxK, key_BxSxHxK, value_BxSxHxK, layout, window)
    if visibility == "visible":
        return visible_attention(query_BxSxHxK, key_BxSxHxK, value_BxSxHxK, layout)
    raise ValueError(
        f"Unknown pause visibility {visibility!r}; expected one of {VISIBILITY_MODES}."
    )
