"""Pause-aware attention: slot layout, visibility masks and the reference kernel.

Every real token n owns W slots (n, 0), ..., (n, W-1), flattened token-major into
S = L * W slots. Two visibility modes decide which slots a query may read:

- 'visible': pauses are ordinary context. The flattened slots form one causal
    sequence, so slot (n, i) sees (m, j) when m < n, or m == n and j <= i.
- 'private': slot (n, i) sees the real slots (m, 0) with m <= n and its own
    token's slots (n, j) with j <= i. No later slot ever sees a pause, so step-0
    outputs equal those of the same weights run with W = 1.

In both modes a slot only sees slots of its own packed segment.

The kernel here is the dense masked reference over all S x S slot pairs. It is
obviously correct and costs O((L * W)^2); faster kernels are tested against it.
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
