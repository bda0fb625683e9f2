"""Shared pieces of the benchmarks: the model setup, a synthetic batch and timing."""

import dataclasses
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import ap as ap_config
from configs import ce as ce_config
from configs import pause_ce as pause_ce_config
from cyb_jax import model as model_lib
from cyb_jax import objective as objective_lib
from cyb_jax import train

CONFIGS = {"ce": ce_config, "pause_ce": pause_ce_config, "ap": ap_config}


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The model and batch shape shared by every case of one benchmark run."""

    num_layers: int
    d_model: int
    num_heads: int
    mlp_dim: int
    vocab_size: int
    tokens_per_batch: int  # real tokens per step; the batch size is this over seq_len

    @classmethod
    def add_arguments(cls, parser, *, vocab: int, repeats: int) -> None:
        """Add the model-size flags and --repeats to an argparse parser."""
        parser.add_argument("--layers", type=int, default=2, help="decoder layers")
        parser.add_argument("--d-model", type=int, default=128, help="model width")
        parser.add_argument("--heads", type=int, default=4, help="attention heads")
        parser.add_argument("--mlp-dim", type=int, default=384, help="hidden width of the MLP")
        parser.add_argument("--vocab", type=int, default=vocab, help="real tokens V")
        parser.add_argument(
            "--tokens-per-batch", type=int, default=1024, help="real tokens per train step"
        )
        parser.add_argument(
            "--repeats", type=int, default=repeats, help="timing rounds; each times every case once"
        )

    @classmethod
    def from_arguments(cls, args) -> "ModelSize":
        return cls(
            num_layers=args.layers,
            d_model=args.d_model,
            num_heads=args.heads,
            mlp_dim=args.mlp_dim,
            vocab_size=args.vocab,
            tokens_per_batch=args.tokens_per_batch,
        )

    def describe(self) -> str:
        return (
            f"layers={self.num_layers} d_model={self.d_model} heads={self.num_heads} "
            f"mlp_dim={self.mlp_dim} vocab={self.vocab_size} "
            f"real tokens per step={self.tokens_per_batch}"
        )


def run_config(
    loss: str,
    window: int,
    visibility: str,
    seq_len: int,
    size: ModelSize,
    head_chunk: int | None = None,
) -> ml_collections.ConfigDict:
    """Return the experiment config of `loss` with the benchmark's shapes."""
    if size.tokens_per_batch % seq_len:
        raise ValueError(
            f"tokens per batch {size.tokens_per_batch} is not a multiple of seq_len {seq_len}"
        )
    config = CONFIGS[loss].get_config()
    config.pause.window = window
    config.model.pause_visibility = visibility
    config.model.num_layers = size.num_layers
    config.model.d_model = size.d_model
    config.model.num_heads = size.num_heads
    config.model.mlp_dim = size.mlp_dim
    config.data.vocab_size = size.vocab_size
    config.data.seq_len = seq_len
    config.data.batch_size = size.tokens_per_batch // seq_len
    if head_chunk is not None:
        config.model.head_chunk = head_chunk
    return config


def synthetic_batch(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """Return a batch of random tokens, each row one example without padding."""
    batch_size, seq_len = config.data.batch_size, config.data.seq_len
    rng = np.random.default_rng(0)
    targets = rng.integers(1, config.data.vocab_size, size=(batch_size, seq_len))
    inputs = np.concatenate([np.zeros((batch_size, 1), np.int64), targets[:, :-1]], axis=1)
    return {
        "inputs": jnp.asarray(inputs, jnp.int32),
        "targets": jnp.asarray(targets, jnp.int32),
        "weights": jnp.ones((batch_size, seq_len), jnp.float32),
        "segment_ids": jnp.ones((batch_size, seq_len), jnp.int32),
        "positions": jnp.asarray(np.tile(np.arange(seq_len), (batch_size, 1)), jnp.int32),
    }


@dataclasses.dataclass
class TrainCase:
    """A jitted train step with its initial state and batch."""

    config: ml_collections.ConfigDict
    model_config: model_lib.TransformerConfig
    step_fn: object
    state: train.TrainState
    batch: dict[str, jax.Array]


def build_train_case(config: ml_collections.ConfigDict) -> TrainCase:
    """Build the model, optimizer, state and jitted train step as training does, on one device."""
    model_config = model_lib.from_config(config, config.data.vocab_size)
    model = model_lib.Transformer(model_config)
    optimizer, _ = train.make_optimizer(config.optimizer, config.total_steps)
    batch = synthetic_batch(config)
    params = nn.meta.unbox(
        model.init(jax.random.key(0), batch["inputs"], batch["positions"], batch["segment_ids"])[
            "params"
        ]
    )
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(1)),
    )
    objective = objective_lib.make_objective(config, model_config)
    step_fn = jax.jit(
        functools.partial(train.train_step, model=model, optimizer=optimizer, objective=objective),
        donate_argnums=(0,),
    )
    return TrainCase(config, model_config, step_fn, state, batch)


def median_seconds(run, repeats: int) -> float:
    """Call `run()` (which must block until its result is ready) and return the median time."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_step_runner(case: TrainCase):
    """Return `run()`, which applies one train step to the case's state and blocks.

    The first call compiles. The state advances with every call, as in training.
    """
    state = case.state

    def run():
        nonlocal state
        state, metrics = case.step_fn(state, case.batch)
        jax.block_until_ready(metrics["loss"])

    return run


def time_train_steps(case: TrainCase, repeats: int) -> float:
    """Compile and run one step, then return the median seconds of `repeats` further steps."""
    run = make_step_runner(case)
    run()
    return median_seconds(run, repeats)


def time_round_robin(runners: list, repeats: int) -> list[float]:
    """Return each runner's median seconds over `repeats` rounds that call every runner once.

    Interleaving the runners exposes them to the same background load on a shared
    machine, which keeps their ratios meaningful when the load changes over time.
    """
    times = [[] for _ in runners]
    for _ in range(repeats):
        for index, run in enumerate(runners):
            start = time.perf_counter()
            run()
            times[index].append(time.perf_counter() - start)
    return [statistics.median(case_times) for case_times in times]


def make_matmul_runner(size: int = 2048):
    """Return `run()` for a jitted float32 [size, size] x [size, size] jnp.dot, and its FLOPs.

    The first call of `run` compiles.
    """
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(size, size)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(size, size)), jnp.float32)
    dot = jax.jit(jnp.dot)

    def run():
        dot(a, b).block_until_ready()

    return run, 2.0 * size**3


def describe_machine() -> str:
    devices = jax.devices()
    return (
        f"jax {jax.__version__}, {len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
    )
