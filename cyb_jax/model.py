"""Decoder-only transformer in which every real token owns W pause slots.

Slot (n, 0) reads token n's embedding; slot (n, i), i >= 1, reads the learned
embedding of the pause code <pause_i> (plus the token's embedding when
`pause_input == 'token+code'`). All slots of token n share RoPE position n, so
pauses never shift the positions of later tokens. The head emits V + 1 logits
per slot; index V is don't-know (DK).

Id layout of the shared embedding table: [0, V) real tokens, V the DK output,
V + i the input code <pause_i> for 1 <= i < W, then padding up to a multiple of
`vocab_multiple` so that the table divides the mesh axis it is sharded over.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cyb_jax import attention
from cyb_jax import head as head_lib

PAUSE_INPUTS = ("code", "token+code")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Static model hyper-parameters; built from the run config by `from_config`."""

    vocab_size: int  # real tokens V
    window: int = 1
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    mlp_dim: int = 768
    dtype: str = "float32"
    param_dtype: str = "float32"
    pause_visibility: str = "visible"
    attention: str = "fused"  # kernel: 'fused' or 'reference', as in attention.slot_attention
    pause_input: str = "code"
    dk_prior: float = 0.0  # 0: no DK offset
    vocab_multiple: int = 128
    rope_base: float = 10_000.0
    # Slots per chunk of the output head when the model is given targets; 0 computes
    # all logits [B, L * W, V + 1] at once. See head.py.
    head_chunk: int = 0

    @property
    def dk_id(self) -> int:
        return self.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table: V real tokens, DK, W-1 pause codes, padding."""
        needed = self.vocab_size + self.window
        return -(-needed // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def dk_offset(self) -> float:
        """DK logit offset giving d = dk_prior when the other V logits are uniform."""
        if not self.dk_prior:
            return 0.0
        return math.log(self.dk_prior * self.vocab_size / (1.0 - self.dk_prior))


def from_config(config: ml_collections.ConfigDict, vocab_size: int) -> TransformerConfig:
    model = config.model
    return TransformerConfig(
        vocab_size=vocab_size,
        window=config.pause.window,
        num_layers=model.num_layers,
        d_model=model.d_model,
        num_heads=model.num_heads,
        mlp_dim=model.mlp_dim,
        dtype=model.dtype,
        param_dtype=model.param_dtype,
        pause_visibility=model.pause_visibility,
        attention=model.attention,
        pause_input=config.pause.input,
        dk_prior=model.dk_prior,
        vocab_multiple=model.vocab_multiple,
        rope_base=model.rope_base,
        head_chunk=model.head_chunk,
    )


class Projection(nn.Module):
    """A bias-free linear map contracting the last `input_axes` axes into `features`.

    The kernel is created in its full multi-axis shape, so every axis carries its
    logical name (flax's DenseGeneral creates a flattened kernel first, which cannot
    take a sharding constraint for the unflattened names).
    """

    features: tuple[int, ...]
    logical_axes: tuple[str, ...]
    input_axes: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        contracted = tuple(x.shape[-self.input_axes :])
        kernel = projection_kernel(
            self, contracted, tuple(self.features), self.logical_axes, self.param_dtype
        )
        return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.input_axes)


def projection_kernel(
    module: nn.Module,
    contracted: tuple[int, ...],
    features: tuple[int, ...],
    logical_axes: tuple[str, ...],
    param_dtype: str,
) -> jax.Array:
    """Declare the parameter 'kernel' [*contracted, *features] of `module`, fan-in scaled."""
    shape = contracted + features
    init = nn.initializers.variance_scaling(
        1.0,
        "fan_in",
        "truncated_normal",
        in_axis=tuple(range(len(contracted))),
        out_axis=tuple(range(len(contracted), len(shape))),
    )
    return module.param(
        "kernel",
        nn.with_logical_partitioning(init, logical_axes),
        shape,
        jnp.dtype(param_dtype),
    )


def apply_rope(x_BxSxHxK: jax.Array, positions_BxS: jax.Array, base: float) -> jax.Array:
    """Rotate pairs of features by position-dependent angles (rotate-half convention)."""
    half = x_BxSxHxK.shape[-1] // 2
    inverse_frequency = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxSxHalf = positions_BxS[..., None].astype(jnp.float32) * inverse_frequency[None, None, :]
    sin = jnp.sin(angle_BxSxHalf)[:, :, None, :]
    cos = jnp.cos(angle_BxSxHalf)[:, :, None, :]
    x = x_BxSxHxK.astype(jnp.float32)
    first, second = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
    return rotated.astype(x_BxSxHxK.dtype)


class RMSNorm(nn.Module):
    dtype: str = "float32"
    param_dtype: str = "float32"
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            jnp.dtype(self.param_dtype),
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (normed * scale).astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE over the slots of `x_BxSxD`.

    Given the `layout` of all slots of the sequence (training and evaluation), the
    `config.attention` kernel applies the pause visibility and `mask_Bx1xSxS` is
    unused. Otherwise the dense reference kernel applies `mask_Bx1xSxS`. With
    `past_key_value`, the keys and values of C earlier slots [B, C, H, K] are
    read before the new ones, and the mask is [B, 1, S, C + S]. The new slots' keys
    (after RoPE) and values are sown into the 'cache' collection, from which a
    decoder reads them when it applies the model with that collection mutable.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BxSxD, positions_BxS, mask_Bx1xSxS, past_key_value=None, layout=None):
        cfg = self.config
        if layout is not None and past_key_value is not None:
            raise ValueError("Attention takes a slot layout or past keys and values, not both.")

        def dense(name, features, logical, input_axes=1):
            return Projection(features, logical, input_axes, cfg.dtype, cfg.param_dtype, name=name)

        heads_kv = (cfg.num_heads, cfg.head_dim)
        query = dense("query", heads_kv, ("embed", "heads", "kv"))(x_BxSxD)
        key = dense("key", heads_kv, ("embed", "heads", "kv"))(x_BxSxD)
        value = dense("value", heads_kv, ("embed", "heads", "kv"))(x_BxSxD)
        query = apply_rope(query, positions_BxS, cfg.rope_base)
        key = apply_rope(key, positions_BxS, cfg.rope_base)
        activation_axes = ("act_batch", "act_length", "act_heads", "act_kv")
        query = nn.with_logical_constraint(query, activation_axes)
        key = nn.with_logical_constraint(key, activation_axes)
        value = nn.with_logical_constraint(value, activation_axes)
        self.sow("cache", "key_value", (key, value))
        if past_key_value is not None:
            past_key, past_value = past_key_value
            key = jnp.concatenate([past_key.astype(key.dtype), key], axis=1)
            value = jnp.concatenate([past_value.astype(value.dtype), value], axis=1)
        if layout is not None:
            out_BxSxHxK = attention.slot_attention(
                query, key, value, layout, cfg.window, cfg.pause_visibility, cfg.attention
            )
        else:
            out_BxSxHxK = attention.reference_attention(query, key, value, mask_Bx1xSxS)
        return dense("out", (cfg.d_model,), ("heads", "kv", "embed"), input_axes=2)(out_BxSxHxK)


class GatedMLP(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BxSxD):
        cfg = self.config

        def dense(name, features, logical):
            return Projection((features,), logical, 1, cfg.dtype, cfg.param_dtype, name=name)

        gate = dense("gate", cfg.mlp_dim, ("embed", "mlp"))(x_BxSxD)
        up = dense("up", cfg.mlp_dim, ("embed", "mlp"))(x_BxSxD)
        hidden_BxSxF = nn.with_logical_constraint(
            nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp")
        )
        return dense("down", cfg.d_model, ("mlp", "embed"))(hidden_BxSxF)


class DecoderBlock(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BxSxD, positions_BxS, mask_Bx1xSxS, past_key_value=None, layout=None):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
        x_BxSxD = x_BxSxD + Attention(cfg, name="attention")(
            norm("attention_norm")(x_BxSxD), positions_BxS, mask_Bx1xSxS, past_key_value, layout
        )
        x_BxSxD = x_BxSxD + GatedMLP(cfg, name="mlp")(norm("mlp_norm")(x_BxSxD))
        return nn.with_logical_constraint(x_BxSxD, ("act_batch", "act_length", "act_embed"))


def embed_slots(
    embedding_VxD: jax.Array, tokens_BxS: jax.Array, steps_BxS: jax.Array, config: TransformerConfig
) -> jax.Array:
    """Return the input vectors [B, S, D] of slots given their token ids and pause steps.

    Step 0 reads the token; step i >= 1 reads the code <pause_i> at id V + i, plus the
    token's embedding when `config.pause_input == 'token+code'`.
    """
    if config.pause_input not in PAUSE_INPUTS:
        raise ValueError(
            f"Unknown pause input {config.pause_input!r}; expected one of {PAUSE_INPUTS}."
        )
    token_BxSxD = jnp.take(embedding_VxD, tokens_BxS, axis=0)
    is_pause_BxSx1 = (steps_BxS > 0)[..., None]
    pause_ids_BxS = jnp.where(steps_BxS > 0, config.vocab_size + steps_BxS, 0)
    pause_BxSxD = jnp.take(embedding_VxD, pause_ids_BxS, axis=0)
    if config.pause_input == "token+code":
        return token_BxSxD + jnp.where(is_pause_BxSx1, pause_BxSxD, 0.0)
    return jnp.where(is_pause_BxSx1, pause_BxSxD, token_BxSxD)


def output_logits(logits_BxSxP: jax.Array, config: TransformerConfig) -> jax.Array:
    """Keep the V real logits and DK of the head's output, in float32, with the DK offset."""
    # Pause codes and padding are inputs only.
    logits_BxSxV1 = logits_BxSxP[..., : config.vocab_size + 1].astype(jnp.float32)
    return logits_BxSxV1.at[..., config.dk_id].add(config.dk_offset)


class OutputHead(nn.Module):
    """The output projection of the slots' hidden states [B, S, D] onto the vocabulary.

    Without targets it returns the `output_logits` [B, S, V + 1]. With targets [B, S]
    it returns the `losses.StepLogProbs` of the slots, each array [B, S], computed in
    chunks of `config.head_chunk` slots (all at once when that is 0).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, targets_BxS: jax.Array | None = None):
        cfg = self.config
        kernel_DxP = projection_kernel(
            self, (cfg.d_model,), (cfg.padded_vocab_size,), ("embed", "vocab"), cfg.param_dtype
        )

        def logits_fn(x_BxCxD):
            # The matmul accumulates and returns float32 also when dtype is bfloat16.
            logits_BxCxP = jnp.tensordot(
                x_BxCxD.astype(cfg.dtype),
                kernel_DxP.astype(cfg.dtype),
                axes=1,
                preferred_element_type=jnp.float32,
            )
            logits_BxCxP = nn.with_logical_constraint(
                logits_BxCxP, ("act_batch", "act_length", "act_vocab")
            )
            return output_logits(logits_BxCxP, cfg)

        if targets_BxS is None:
            return logits_fn(x_BxSxD)
        if cfg.head_chunk < 0:
            raise ValueError(f"head_chunk must be 0 or a positive slot count, got {cfg.head_chunk}")
        if cfg.head_chunk == 0:
            return head_lib.step_log_probs_of_slots(logits_fn, x_BxSxD, targets_BxS, cfg.dk_id)
        return head_lib.chunked_step_log_probs(
            logits_fn, x_BxSxD, targets_BxS, cfg.dk_id, cfg.head_chunk
        )


class Transformer(nn.Module):
    """Maps token ids [B, L] to per-slot logits [B, L, W, V + 1].

    Given `targets_BxL`, it returns the `losses.StepLogProbs` of those targets
    instead, each array [B, L, W], without forming all logits at once unless
    `config.head_chunk` is 0. `granted_steps_BxL` (training recipe 'sampled') leaves
    slot (n, i) out of attention for i >= granted_steps[n]; its logits are then
    meaningless.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        inputs_BxL,
        positions_BxL,
        segment_ids_BxL,
        granted_steps_BxL=None,
        targets_BxL=None,
    ):
        cfg = self.config
        batch, length = inputs_BxL.shape
        window = cfg.window

        embedding_VxD = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (cfg.padded_vocab_size, cfg.d_model),
            jnp.dtype(cfg.param_dtype),
        )
        embedding_VxD = embedding_VxD.astype(cfg.dtype)
        tokens_BxS = jnp.repeat(inputs_BxL, window, axis=1)
        steps_BxS = jnp.broadcast_to(jnp.tile(jnp.arange(window), length), (batch, length * window))
        x_BxSxD = embed_slots(embedding_VxD, tokens_BxS, steps_BxS, cfg)
        # An identity unless a 'perturbations' collection is passed: tests take gradients
        # with respect to it to check which slots each output depends on.
        x_BxSxD = self.perturb("slots", x_BxSxD)
        x_BxSxD = nn.with_logical_constraint(x_BxSxD, ("act_batch", "act_length", "act_embed"))

        layout = attention.slot_layout(segment_ids_BxL, window, granted_steps_BxL)
        positions_BxS = jnp.repeat(positions_BxL, window, axis=1)

        for layer in range(cfg.num_layers):
            x_BxSxD = DecoderBlock(cfg, name=f"layer_{layer}")(
                x_BxSxD, positions_BxS, None, layout=layout
            )
        x_BxSxD = RMSNorm(cfg.dtype, cfg.param_dtype, name="final_norm")(x_BxSxD)

        head = OutputHead(cfg, name="head")
        if targets_BxL is None:
            logits_BxSxV1 = head(x_BxSxD)
            return logits_BxSxV1.reshape(batch, length, window, cfg.vocab_size + 1)
        targets_BxS = jnp.repeat(targets_BxL, window, axis=1)
        log_probs_BxS = head(x_BxSxD, targets_BxS)
        return jax.tree.map(lambda array: array.reshape(batch, length, window), log_probs_BxS)
