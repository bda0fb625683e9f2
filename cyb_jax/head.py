"""Output head that returns the per-slot log probabilities the losses need, chunk by chunk.

The losses read three numbers per slot (`losses.StepLogProbs`): log t_i, log d_i and
log(1 - d_i). Computing them from the full logits [B, S, V + 1] keeps that float32
array, and its gradient, alive for the whole backward pass. `chunked_step_log_probs`
instead maps over chunks of slots: each chunk computes its logits [B, C, V + 1],
reduces them to the three numbers and drops them. The chunk function is wrapped in
`jax.checkpoint`, so the backward pass recomputes each chunk's logits instead of
storing them, and neither pass forms the logits of all slots at once.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from cyb_jax import losses

# Maps hidden states [B, C, D] of C slots to their logits [B, C, V + 1] in float32.
LogitsFn = Callable[[jax.Array], jax.Array]


def step_log_probs_of_slots(
    logits_fn: LogitsFn, x_BxSxD: jax.Array, targets_BxS: jax.Array, dk_id: int
) -> losses.StepLogProbs:
    """Compute log t, log d and log(1 - d) of every slot from all logits at once.

    Each returned array has shape [B, S]. This is the reference that the chunked
    version must match.
    """
    logits_BxSx1xV1 = logits_fn(x_BxSxD)[:, :, None, :]
    log_probs = losses.step_log_probs(logits_BxSx1xV1, targets_BxS, dk_id)
    return jax.tree.map(lambda array: array[..., 0], log_probs)


def chunked_step_log_probs(
    logits_fn: LogitsFn,
    x_BxSxD: jax.Array,
    targets_BxS: jax.Array,
    dk_id: int,
    chunk_slots: int,
) -> losses.StepLogProbs:
    """Compute log t, log d and log(1 - d) of every slot, `chunk_slots` slots at a time.

    Returns a `losses.StepLogProbs` of arrays [B, S], equal to
    `step_log_probs_of_slots` up to float rounding. When `chunk_slots` does not divide
    S, the slots are padded with zeros to a multiple of it and the padded results are
    dropped. A `chunk_slots` of S or more computes a single chunk.
    """
    if chunk_slots < 1:
        raise ValueError(f"chunk_slots must be a positive number of slots, got {chunk_slots}")
    batch, slots, features = x_BxSxD.shape
    chunk = min(chunk_slots, slots)
    num_chunks = -(-slots // chunk)
    padding = num_chunks * chunk - slots
    if padding:
        x_BxSxD = jnp.pad(x_BxSxD, ((0, 0), (0, padding), (0, 0)))
        targets_BxS = jnp.pad(targets_BxS, ((0, 0), (0, padding)))

    # Chunks become the leading axis, which jax.lax.map walks.
    x_NxBxCxD = x_BxSxD.reshape(batch, num_chunks, chunk, features).transpose(1, 0, 2, 3)
    targets_NxBxC = targets_BxS.reshape(batch, num_chunks, chunk).transpose(1, 0, 2)

    @jax.checkpoint
    def one_chunk(inputs):
        x_BxCxD, targets_BxC = inputs
        return step_log_probs_of_slots(logits_fn, x_BxCxD, targets_BxC, dk_id)

    per_chunk = jax.lax.map(one_chunk, (x_NxBxCxD, targets_NxBxC))

    def unchunk(array_NxBxC):
        array_BxS = array_NxBxC.transpose(1, 0, 2).reshape(batch, num_chunks * chunk)
        return array_BxS[:, :slots]

    return jax.tree.map(unchunk, per_chunk)
