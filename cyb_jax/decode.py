"""Generate text from a trained workdir with a KV cache and self-paced pauses.

    python -m cyb_jax.decode --workdir=runs/ap --prompt="ROMEO:" [--step=N] [--show_pauses]

The decoder follows the model's pause visibility (see `attention.py`):

- 'visible': every fed token runs all W slots, as in training, because later
  tokens see every earlier pause. The answer is read out at the first step i
  where the model does not ask to wait: d_i <= threshold, or, with
  `sample_pauses`, a draw that waits with probability d_i. The last step always
  answers.
- 'private': a fed token runs its real slot only. Pause slot i + 1 runs only
  when step i asks to wait, and once the token is answered its pause keys and
  values are dropped, so the cache holds real tokens only. Prompt tokens before
  the last one need no pause at all.

`Generation.slots_run / Generation.fixed_slots` is the compute spent relative
to a model that runs all W slots for every fed token.

The first input of every sequence is id 0, as in training, where the inputs are
the targets shifted right with 0 at each segment start. Positions count fed
real tokens from 0, and every slot of a token shares its position.
"""

import dataclasses
import json
import os
import sys
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cyb_jax import attention
from cyb_jax import checkpointing
from cyb_jax import model as model_lib

# Input id of the first slot of a sequence; the data pipeline puts 0 at each segment start.
START_ID = 0
# SentencePiece marks a word start with this character; it is printed as a space.
WORD_START = "\u2581"
# ANSI 256-colour backgrounds for 1, 2 and 3 or more pauses (yellow to red).
PAUSE_COLOURS = (229, 215, 203)


class Run(NamedTuple):
    """A trained workdir loaded for inference."""

    config: ml_collections.ConfigDict
    model_config: model_lib.TransformerConfig
    params: Any
    vocabulary: Any  # seqio.Vocabulary
    step: int


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """Read the config a run saved in `workdir/config.json`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found. Point --workdir at the directory a training run wrote."
        )
    with open(path, encoding="utf-8") as handle:
        return ml_collections.ConfigDict(json.load(handle))


def restore_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
    """Read the parameters of checkpoint `step` (default: the newest) as device arrays."""
    import orbax.checkpoint as ocp  # imported here: orbax is slow to import

    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} not found: the run saved no checkpoint yet.")
    with ocp.CheckpointManager(
        directory, item_names=(checkpointing.STATE, checkpointing.DATA)
    ) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"No finished checkpoint in {directory}.")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"No checkpoint at step {step} in {directory}; saved steps: {steps}.")
        restored = manager.restore(
            step, args=ocp.args.Composite(**{checkpointing.STATE: ocp.args.StandardRestore()})
        )
    params = jax.tree.map(jnp.asarray, restored[checkpointing.STATE]["params"])
    return params, step


def load_run(workdir: str, step: int | None = None) -> Run:
    """Load the config, vocabulary and parameters of a workdir."""
    from cyb_jax import data  # imported here: TensorFlow is slow to import

    config = load_config(workdir)
    vocabulary = data.get_vocabulary(config.data)
    model_config = model_lib.from_config(config, vocabulary.vocab_size)
    params, step = restore_params(workdir, step)
    return Run(config, model_config, params, vocabulary, step)


# ----------------------------------------------------------------------- cache


class KVCache(NamedTuple):
    """Keys and values of earlier slots, per row, with the slot indices masks need.

    Entries at index >= `length[b]` of row b are stale and masked out, so dropping
    the newest entries is a matter of lowering `length`.
    """

    keys: tuple[jax.Array, ...]  # per layer, [B, C, H, K], after RoPE
    values: tuple[jax.Array, ...]  # per layer, [B, C, H, K]
    token: jax.Array  # index (and position) of the slot's real token, [B, C]
    step: jax.Array  # pause step of the slot, [B, C]
    length: jax.Array  # valid entries per row, [B]


def init_cache(model_config: model_lib.TransformerConfig, batch: int, capacity: int) -> KVCache:
    shape = (batch, capacity, model_config.num_heads, model_config.head_dim)
    zeros = tuple(jnp.zeros(shape, model_config.dtype) for _ in range(model_config.num_layers))
    index = jnp.zeros((batch, capacity), jnp.int32)
    return KVCache(zeros, zeros, index, index, jnp.zeros((batch,), jnp.int32))


def _write_rows(buffer_BxC: jax.Array, update_BxQ: jax.Array, start_B: jax.Array) -> jax.Array:
    """Write each row's update at its own start index along axis 1."""
    write = lambda buffer, update, start: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        buffer, update, start, axis=0
    )
    return jax.vmap(write)(buffer_BxC, update_BxQ.astype(buffer_BxC.dtype), start_B)


def forward_slots(
    params: Any,
    model_config: model_lib.TransformerConfig,
    cache: KVCache,
    tokens_BxQ: jax.Array,
    steps_BxQ: jax.Array,
    positions_BxQ: jax.Array,
    counts_B: jax.Array,
) -> tuple[jax.Array, KVCache]:
    """Run Q new slots per row after the cached ones; return logits [B, Q, V + 1] and the cache.

    Slot j of row b is (token `positions[b, j]`, step `steps[b, j]`) reading token id
    `tokens[b, j]`. Only the first `counts[b]` new slots of row b enter the cache and
    are seen by other slots. The outputs of the rest are meaningless. New slots must be
    in token-major order, as in training. The cache needs room for Q entries after the
    longest row, because `dynamic_update_slice` would otherwise shift the write.
    """
    cfg = model_config
    new_slots = tokens_BxQ.shape[1]
    capacity = cache.token.shape[1]
    new_valid_BxQ = jnp.arange(new_slots)[None, :] < counts_B[:, None]
    cached_valid_BxC = jnp.arange(capacity)[None, :] < cache.length[:, None]
    key_token = jnp.concatenate([cache.token, positions_BxQ], axis=1)
    key_step = jnp.concatenate([cache.step, steps_BxQ], axis=1)
    key_valid = jnp.concatenate([cached_valid_BxC, new_valid_BxQ], axis=1)
    allowed_BxQxK = attention.visibility_mask(
        positions_BxQ[:, :, None],
        steps_BxQ[:, :, None],
        key_token[:, None, :],
        key_step[:, None, :],
        cfg.pause_visibility,
    )
    mask_Bx1xQxK = (allowed_BxQxK & key_valid[:, None, :])[:, None, :, :]

    embedding_VxD = params["embedding"].astype(cfg.dtype)
    x_BxQxD = model_lib.embed_slots(embedding_VxD, tokens_BxQ, steps_BxQ, cfg)
    keys, values = [], []
    for layer in range(cfg.num_layers):
        past = (cache.keys[layer], cache.values[layer])
        x_BxQxD, sown = model_lib.DecoderBlock(cfg).apply(
            {"params": params[f"layer_{layer}"]},
            x_BxQxD,
            positions_BxQ,
            mask_Bx1xQxK,
            past,
            mutable=["cache"],
        )
        ((new_key, new_value),) = sown["cache"]["attention"]["key_value"]
        keys.append(_write_rows(cache.keys[layer], new_key, cache.length))
        values.append(_write_rows(cache.values[layer], new_value, cache.length))
    x_BxQxD = model_lib.RMSNorm(cfg.dtype, cfg.param_dtype).apply(
        {"params": params["final_norm"]}, x_BxQxD
    )
    head = model_lib.Projection(
        (cfg.padded_vocab_size,), ("embed", "vocab"), 1, cfg.dtype, cfg.param_dtype
    )
    logits_BxQxP = head.apply({"params": params["head"]}, x_BxQxD)
    new_cache = KVCache(
        keys=tuple(keys),
        values=tuple(values),
        token=_write_rows(cache.token, positions_BxQ, cache.length),
        step=_write_rows(cache.step, steps_BxQ, cache.length),
        length=cache.length + counts_B,
    )
    return model_lib.output_logits(logits_BxQxP, cfg), new_cache


_forward_slots = jax.jit(forward_slots, static_argnums=(1,))


# ------------------------------------------------------------------ generation


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How the decoder picks tokens and decides to pause."""

    temperature: float = 0.0  # 0 picks the most likely token (greedy)
    top_k: int = 0  # sample among the k most likely tokens; 0: all of them
    pause_threshold: float = 0.5  # wait at step i while d_i > threshold
    sample_pauses: bool = False  # wait with probability d_i instead of the threshold
    seed: int = 0


@dataclasses.dataclass
class Generation:
    """The output of one prompt."""

    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, EOS included when it was generated
    pauses: list[int]  # pauses spent on the prediction of each generated token
    slots_run: int  # slots the decoder needed: 1 per fed token plus the pauses it ran
    fixed_slots: int  # slots a model running all W slots per fed token would run
    # (token index, step) -> logits [V + 1] of every slot run, when requested.
    step_logits: dict[tuple[int, int], np.ndarray] = dataclasses.field(default_factory=dict)


def _dont_know(logits_V1: np.ndarray) -> float:
    logits = logits_V1.astype(np.float64)
    shifted = logits - logits.max()
    return float(np.exp(shifted[-1]) / np.exp(shifted).sum())


def wants_pause(logits_V1: np.ndarray, options: SamplingOptions, rng: np.random.Generator) -> bool:
    """Decide from one step's logits whether the model asks to wait."""
    dont_know = _dont_know(logits_V1)
    if options.sample_pauses:
        return bool(rng.random() < dont_know)
    return dont_know > options.pause_threshold


def choose_token(logits_V1: np.ndarray, options: SamplingOptions, rng: np.random.Generator) -> int:
    """Pick a real token from one step's logits; DK is excluded."""
    logits = logits_V1[:-1].astype(np.float64)
    if options.temperature <= 0.0:
        return int(np.argmax(logits))
    logits = logits / options.temperature
    if 0 < options.top_k < logits.size:
        cutoff = np.sort(logits)[-options.top_k]
        logits = np.where(logits >= cutoff, logits, -np.inf)
    probs = np.exp(logits - logits.max())
    return int(rng.choice(logits.size, p=probs / probs.sum()))


def generate(
    params: Any,
    model_config: model_lib.TransformerConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    options: SamplingOptions = SamplingOptions(),
    record_logits: bool = False,
) -> list[Generation]:
    """Generate up to `max_new_tokens` tokens after each prompt of token ids.

    Prompts may differ in length. A row stops at `eos_id`. Row b draws its random
    choices from its own generator, seeded with (options.seed, b).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    window = model_config.window
    private = model_config.pause_visibility == "private"
    fed = [[START_ID, *prompt] for prompt in prompts]
    batch = len(fed)
    longest = max(len(row) for row in fed)
    slots_per_token = 1 if private else window
    total_tokens = longest + max_new_tokens
    # Room for every fed token, a private token's pauses and one chunk of stale writes.
    capacity = total_tokens * slots_per_token + max(longest * slots_per_token, window)
    cache = init_cache(model_config, batch, capacity)
    rngs = [np.random.default_rng([options.seed, row]) for row in range(batch)]
    results = [
        Generation(list(prompt), [], [], 0, len(row) * window) for prompt, row in zip(prompts, fed)
    ]

    def run(tokens, steps, positions, counts):
        nonlocal cache
        counts = np.asarray(counts, np.int32)
        logits, cache = _forward_slots(
            params,
            model_config,
            cache,
            jnp.asarray(tokens, jnp.int32),
            jnp.asarray(steps, jnp.int32),
            jnp.asarray(positions, jnp.int32),
            jnp.asarray(counts),
        )
        for row in range(batch):
            results[row].slots_run += int(counts[row])
        return np.asarray(logits)

    def record(row, token_index, step, logits_V1):
        if record_logits:
            results[row].step_logits[(token_index, step)] = logits_V1

    # Prefill: the prompt's real slots (private) or all its slots (visible), right-padded.
    steps_per_token = 1 if private else window
    tokens = np.zeros((batch, longest * steps_per_token), np.int32)
    for row, ids in enumerate(fed):
        tokens[row, : len(ids) * steps_per_token] = np.repeat(ids, steps_per_token)
    steps = np.tile(np.arange(steps_per_token), (batch, longest))
    positions = np.repeat(np.tile(np.arange(longest), (batch, 1)), steps_per_token, axis=1)
    logits = run(tokens, steps, positions, [len(ids) * steps_per_token for ids in fed])
    logits = logits.reshape(batch, longest, steps_per_token, -1)
    current = []  # per row, logits [steps run so far, V + 1] of the newest fed token
    for row, ids in enumerate(fed):
        for n in range(len(ids)):
            for i in range(steps_per_token):
                record(row, n, i, logits[row, n, i])
        current.append(list(logits[row, len(ids) - 1]))

    done = [False] * batch
    for produced in range(1, max_new_tokens + 1):
        stops = [0] * batch
        if private:
            # Run pause i + 1 for the rows whose step i asks to wait.
            waiting = [not done[row] for row in range(batch)]
            for i in range(window - 1):
                waiting = [
                    waiting[row] and wants_pause(current[row][i], options, rngs[row])
                    for row in range(batch)
                ]
                if not any(waiting):
                    break
                last = [[fed[row][-1]] for row in range(batch)]
                indices = [[len(fed[row]) - 1] for row in range(batch)]
                logits = run(last, np.full((batch, 1), i + 1), indices, waiting)
                for row in range(batch):
                    if waiting[row]:
                        current[row].append(logits[row, 0])
                        record(row, len(fed[row]) - 1, i + 1, logits[row, 0])
            # Drop the pauses: the cache keeps the real slots only.
            cache = cache._replace(length=jnp.asarray([len(row) for row in fed], jnp.int32))
            stops = [len(current[row]) - 1 for row in range(batch)]
        else:
            for row in range(batch):
                if done[row]:
                    continue
                stop = 0
                while stop < window - 1 and wants_pause(current[row][stop], options, rngs[row]):
                    stop += 1
                stops[row] = stop

        for row in range(batch):
            if done[row]:
                continue
            token = choose_token(current[row][stops[row]], options, rngs[row])
            results[row].token_ids.append(token)
            results[row].pauses.append(stops[row])
            if token == eos_id:
                done[row] = True
        if all(done) or produced == max_new_tokens:
            break

        # Feed each active row's new token.
        active = [not done[row] for row in range(batch)]
        for row in range(batch):
            if active[row]:
                fed[row].append(results[row].token_ids[-1])
                results[row].fixed_slots += window
        new_tokens = np.repeat([[row[-1]] for row in fed], steps_per_token, axis=1)
        steps = np.tile(np.arange(steps_per_token), (batch, 1))
        positions = np.repeat([[len(row) - 1] for row in fed], steps_per_token, axis=1)
        counts = [steps_per_token if active[row] else 0 for row in range(batch)]
        logits = run(new_tokens, steps, positions, counts)
        for row in range(batch):
            if active[row]:
                current[row] = list(logits[row])
                for i in range(steps_per_token):
                    record(row, len(fed[row]) - 1, i, logits[row, i])
    return results


# -------------------------------------------------------------------- display


def token_pieces(vocabulary: Any, token_ids: Sequence[int]) -> list[str]:
    """Return the text of each token, with SentencePiece's word-start mark as a space."""
    tokenizer = vocabulary.tokenizer
    pieces = []
    for token in token_ids:
        if tokenizer.is_control(token):
            pieces.append("")
        else:
            pieces.append(tokenizer.id_to_piece(int(token)).replace(WORD_START, " "))
    return pieces


def render_pauses(pieces: Sequence[str], pauses: Sequence[int], colour: bool) -> str:
    """Mark each token with the pauses spent on it.

    In colour, a token's background goes from yellow (1 pause) to red (3 or more);
    otherwise a token that took n > 0 pauses is followed by "[n]". Tokens without a
    pause are left unmarked.
    """
    parts = []
    for piece, count in zip(pieces, pauses):
        if count == 0 or not piece:
            parts.append(piece)
        elif colour:
            code = PAUSE_COLOURS[min(count, len(PAUSE_COLOURS)) - 1]
            parts.append(f"\x1b[48;5;{code}m\x1b[30m{piece}\x1b[0m")
        else:
            parts.append(f"{piece}[{count}]")
    return "".join(parts)


def pause_legend(window: int, colour: bool) -> str:
    if not colour:
        return "Legend: a token followed by [n] took n pauses; unmarked tokens took none."
    samples = [
        f"\x1b[48;5;{PAUSE_COLOURS[min(n, len(PAUSE_COLOURS)) - 1]}m\x1b[30m {n} \x1b[0m"
        for n in range(1, window)
    ]
    return "Legend: pauses per token " + " ".join(samples) + "; no colour: none."


# ------------------------------------------------------------------------- CLI


def main(argv: Sequence[str]) -> None:
    from absl import app
    from absl import flags
    from absl import logging

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    values = flags.FLAGS
    if not values["verbosity"].present:
        # Keep the INFO chatter of Orbax, TFDS and seqio out of the console.
        logging.set_verbosity(logging.WARNING)
    if not values.prompt:
        raise app.UsageError("Give at least one --prompt.")
    from cyb_jax import data

    data.hide_accelerators_from_tensorflow()
    try:
        run = load_run(values.workdir, values.step)
    except FileNotFoundError as error:
        raise app.UsageError(str(error)) from None
    vocabulary = run.vocabulary
    options = SamplingOptions(
        temperature=values.temperature,
        top_k=values.top_k,
        pause_threshold=values.pause_threshold,
        sample_pauses=values.sample_pauses,
        seed=values.seed,
    )
    prompts = [list(vocabulary.encode(text)) for text in values.prompt]
    longest = max(len(ids) for ids in prompts) + 1 + values.max_new_tokens
    if longest > run.config.data.seq_len:
        print(
            f"Note: sequences of up to {longest} tokens exceed the training length "
            f"{run.config.data.seq_len}; positions beyond it were never trained.",
            file=sys.stderr,
        )
    eos_id = None if values.ignore_eos else vocabulary.eos_id
    results = generate(
        run.params,
        run.model_config,
        prompts,
        max_new_tokens=values.max_new_tokens,
        eos_id=eos_id,
        options=options,
    )
    colour = values.colour == "always" or (values.colour == "auto" and sys.stdout.isatty())
    cfg = run.model_config
    print(
        f"Checkpoint step {run.step} of {values.workdir}: W={cfg.window}, "
        f"pauses {cfg.pause_visibility}, loss {run.config.loss.name}."
    )
    for text, result in zip(values.prompt, results):
        print()
        if values.show_pauses:
            pieces = token_pieces(vocabulary, result.token_ids)
            print(text + render_pauses(pieces, result.pauses, colour))
        else:
            print(text + vocabulary.decode(result.token_ids))
        mean_pauses = float(np.mean(result.pauses))
        print(
            f"[{len(result.token_ids)} tokens, {mean_pauses:.2f} pauses per token; slots run "
            f"{result.slots_run} of {result.fixed_slots} a fixed-pause model would run "
            f"({result.slots_run / result.fixed_slots:.0%})]"
        )
    if values.show_pauses:
        print()
        print(pause_legend(cfg.window, colour))


def run_cli() -> None:
    from absl import app
    from absl import flags

    flags.DEFINE_string("workdir", None, "Workdir of a training run (holds config.json).")
    flags.DEFINE_integer("step", None, "Checkpoint step to load; default: the newest.")
    flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for a batch.")
    flags.DEFINE_integer("max_new_tokens", 40, "Maximum tokens generated per prompt.")
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 picks the likeliest token.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens; 0: no limit.")
    flags.DEFINE_float(
        "pause_threshold", 0.5, "Wait at step i while the don't-know probability d_i exceeds this."
    )
    flags.DEFINE_bool("sample_pauses", False, "Wait with probability d_i instead of the threshold.")
    flags.DEFINE_integer("seed", 0, "Seed of token and pause sampling.")
    flags.DEFINE_bool("ignore_eos", False, "Keep generating after the EOS token.")
    flags.DEFINE_bool("show_pauses", False, "Mark each generated token with its pauses.")
    flags.DEFINE_enum(
        "colour",
        "auto",
        ["auto", "always", "never"],
        "Colour marks: auto uses colour on a terminal.",
    )
    flags.mark_flag_as_required("workdir")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)


if __name__ == "__main__":
    run_cli()
