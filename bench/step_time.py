"""Time the jitted train step of CYB models side by side and check the performance targets.

Run from the repository root, for example

    python -m bench.step_time --quick
    python -m bench.step_time --seq-lens 256 --windows 2,4
    python -m bench.step_time --seq-lens 1024 --windows 4 --losses ap

Every case of one run uses the same model size and the same number of real tokens
per step. All cases are compiled first and then timed in interleaved rounds, each
round running one step of every case, one call of the loss kernel and one large
matmul, and each time is the median over rounds. A change in background load then
affects every case alike, so the printed ratios stay meaningful on a shared machine
while absolute times do not.

Model FLOPs are counted analytically from the shapes: every matmul of the forward
pass, the attention restricted to the (query, key) slot pairs that the pause
visibility allows, and the full padded output head, times 3 for forward plus
backward. Recomputation in the backward pass (the chunked head) and the work a
dense kernel spends on masked pairs are not counted. XLA's own count of the
compiled step (`cost_analysis()['flops']`) is printed next to it.
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from cyb_jax import losses
from cyb_jax import model as model_lib
from cyb_jax import objective as objective_lib

LOSS_SHARE_TARGET = 0.03
SLOT_THROUGHPUT_TARGET = 0.9
PRIVATE_SPEEDUP_TARGET = 2.0
PRIVATE_SPEEDUP_SEQ_LEN = 1024


@dataclasses.dataclass
class Result:
    loss: str
    window: int
    visibility: str
    seq_len: int
    batch_size: int
    step_seconds: float
    loss_seconds: float
    model_flops: float
    xla_flops: float | None

    @property
    def tokens_per_second(self) -> float:
        return self.batch_size * self.seq_len / self.step_seconds

    @property
    def slots_per_second(self) -> float:
        return self.tokens_per_second * self.window

    @property
    def loss_share(self) -> float:
        return self.loss_seconds / self.step_seconds


def visible_keys_per_slot(seq_len: int, window: int, visibility: str) -> float:
    """Mean number of key slots a query slot attends to, for one unpacked row."""
    slots = seq_len * window
    if visibility == "visible":
        return (slots + 1) / 2
    # Slot (n, i) reads the n + 1 real tokens up to its own and its i earlier pauses.
    return (seq_len + 1) / 2 + (window - 1) / 2


def model_flops_per_step(config: model_lib.TransformerConfig, batch_size: int, seq_len: int):
    """Count the forward and backward matmul FLOPs of one train step (see the module doc)."""
    d_model, mlp_dim = config.d_model, config.mlp_dim
    per_slot_layer = 2 * (4 * d_model * d_model + 3 * d_model * mlp_dim)
    keys = visible_keys_per_slot(seq_len, config.window, config.pause_visibility)
    per_slot_layer += 2 * 2 * d_model * keys  # scores and the weighted sum of values
    per_slot = config.num_layers * per_slot_layer + 2 * d_model * config.padded_vocab_size
    slots = batch_size * seq_len * config.window
    return 3.0 * per_slot * slots


def compiled_flops(case: common.TrainCase) -> float | None:
    """XLA's FLOP count of the compiled train step, or None if the backend reports none."""
    compiled = case.step_fn.lower(case.state, case.batch).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def make_loss_runner(case: common.TrainCase, calls: int = 10):
    """Return `run()`, which evaluates the objective's value and gradient `calls` times.

    The log-probabilities have the shape [B, L, W] of the train step, so this is the
    part of the step that the CYB loss itself costs, metrics included. The first call
    of `run` compiles.
    """
    config, batch = case.config, case.batch
    objective = objective_lib.make_objective(config, case.model_config)
    shape = (*batch["targets"].shape, config.pause.window)
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(*shape, 3)), jnp.float32)
    log_probs = losses.step_log_probs(logits, jnp.zeros(shape[:-1], jnp.int32), 2)

    def loss_of(predictions):
        return objective(predictions, batch["targets"], batch["weights"], jnp.asarray(1000))

    value_and_grad = jax.jit(jax.value_and_grad(loss_of, has_aux=True))

    def run():
        for _ in range(calls):
            jax.block_until_ready(value_and_grad(log_probs))

    return run


def run_cases(cases, size, repeats) -> tuple[list[Result], float]:
    """Compile every case, then time them and the matmul in interleaved rounds.

    Returns the results and the matmul FLOP/s measured in the same rounds.
    """
    loss_calls = 10
    prepared = []
    for loss, window, visibility, seq_len in cases:
        config = common.run_config(loss, window, visibility, seq_len, size)
        case = common.build_train_case(config)
        xla_flops = compiled_flops(case)
        step_runner = common.make_step_runner(case)
        loss_runner = make_loss_runner(case, loss_calls)
        step_runner()
        loss_runner()
        prepared.append((case, xla_flops, step_runner, loss_runner))
        print(f"  compiled {loss} W={window} {visibility} seq_len={seq_len}", flush=True)

    matmul_runner, matmul_flops = common.make_matmul_runner()
    matmul_runner()
    runners = [matmul_runner]
    for _, _, step_runner, loss_runner in prepared:
        runners.extend([step_runner, loss_runner])
    matmul_seconds, *seconds = common.time_round_robin(runners, repeats)

    results = []
    for index, (case, xla_flops, _, _) in enumerate(prepared):
        config = case.config
        batch_size, seq_len = config.data.batch_size, config.data.seq_len
        results.append(
            Result(
                loss=config.loss.name,
                window=config.pause.window,
                visibility=config.model.pause_visibility,
                seq_len=seq_len,
                batch_size=batch_size,
                step_seconds=seconds[2 * index],
                loss_seconds=seconds[2 * index + 1] / loss_calls,
                model_flops=model_flops_per_step(case.model_config, batch_size, seq_len),
                xla_flops=xla_flops,
            )
        )
    return results, matmul_flops / matmul_seconds


def print_row(result: Result, peak_flops: float) -> None:
    xla = f"{result.xla_flops / 1e9:9.2f}" if result.xla_flops is not None else "      n/a"
    achieved = result.model_flops / result.step_seconds
    print(
        f"{result.loss:>8} {result.window:>2} {result.visibility:>8} {result.seq_len:>5} "
        f"{result.batch_size:>3} {result.step_seconds * 1e3:9.1f} "
        f"{result.tokens_per_second:9.0f} {result.slots_per_second:9.0f} "
        f"{result.model_flops / 1e9:9.2f} {xla} {100 * achieved / peak_flops:6.1f} "
        f"{result.loss_seconds * 1e3:8.2f} {100 * result.loss_share:6.2f}",
        flush=True,
    )


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def check_targets(results: list[Result]) -> None:
    print("\nTargets")
    worst = max(results, key=lambda r: r.loss_share)
    print(
        f"  {verdict(worst.loss_share <= LOSS_SHARE_TARGET)}  loss kernel <= "
        f"{100 * LOSS_SHARE_TARGET:.0f}% of step time: max {100 * worst.loss_share:.2f}% "
        f"({worst.loss} W={worst.window} {worst.visibility} seq_len={worst.seq_len})"
    )

    for seq_len in sorted({r.seq_len for r in results}):
        at_len = [r for r in results if r.seq_len == seq_len]
        ce = [r for r in at_len if r.loss == "ce" and r.window == 1]
        ap = [r for r in at_len if r.loss == "ap" and r.window == 4 and r.visibility == "private"]
        if ce and ap:
            ratio = ap[0].slots_per_second / ce[0].tokens_per_second
            print(
                f"  {verdict(ratio >= SLOT_THROUGHPUT_TARGET)}  seq_len={seq_len}: ap W=4 private "
                f"slots/s over ce W=1 tokens/s = {ratio:.2f} (target >= {SLOT_THROUGHPUT_TARGET})"
            )
        else:
            print(f"  SKIP  seq_len={seq_len}: slot throughput needs ap W=4 private and ce W=1")

    pairs = {}
    for r in results:
        if r.seq_len == PRIVATE_SPEEDUP_SEQ_LEN and r.window == 4:
            pairs.setdefault(r.loss, {})[r.visibility] = r
    compared = {loss: p for loss, p in pairs.items() if len(p) == 2}
    if not compared:
        print(
            f"  SKIP  private vs visible speed-up needs seq_len={PRIVATE_SPEEDUP_SEQ_LEN}, W=4, "
            "both visibilities"
        )
    for loss, pair in sorted(compared.items()):
        speedup = pair["visible"].step_seconds / pair["private"].step_seconds
        print(
            f"  {verdict(speedup >= PRIVATE_SPEEDUP_TARGET)}  {loss} seq_len="
            f"{PRIVATE_SPEEDUP_SEQ_LEN} W=4: private is {speedup:.2f}x faster than visible "
            f"(target >= {PRIVATE_SPEEDUP_TARGET}x)"
        )


def parse_list(text: str, convert=str) -> list:
    return [convert(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--losses", default="ce,pause_ce,ap", help="comma-separated loss names")
    parser.add_argument("--windows", default="2,4", help="comma-separated slots per token W")
    parser.add_argument("--visibilities", default="visible,private", help="pause visibility modes")
    parser.add_argument("--seq-lens", default="256,1024", help="comma-separated real tokens L")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain ce model at W=1")
    common.ModelSize.add_arguments(parser, vocab=1024, repeats=5)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (seq_len 64 and 128, 256 tokens per step) for a fast check",
    )
    args = parser.parse_args()
    if args.quick:
        args.seq_lens = "64,128"
        args.tokens_per_batch = 256
        args.repeats = 3

    size = common.ModelSize.from_arguments(args)
    cases = []
    for seq_len in parse_list(args.seq_lens, int):
        if not args.no_baseline:
            cases.append(("ce", 1, "visible", seq_len))
        for window in parse_list(args.windows, int):
            for visibility in parse_list(args.visibilities):
                for loss in parse_list(args.losses):
                    cases.append((loss, window, visibility, seq_len))

    print(f"Machine: {common.describe_machine()}")
    print(f"Model: {size.describe()}")
    head_chunk = common.run_config("ce", 1, "visible", cases[0][3], size).model.head_chunk
    print(f"Output head chunk: {head_chunk} slots (0: all logits at once)")
    print(
        "Model GFLOP: analytic forward + backward matmul count; XLA GFLOP: cost_analysis of "
        "the compiled step; %peak: model FLOP/s over the matmul peak; loss: jitted value and "
        "gradient of the objective on log-probabilities of the step's shape\n"
    )
    results, peak_flops = run_cases(cases, size, args.repeats)
    print(f"\nMatmul peak (float32 2048^3 jnp.dot, same rounds): {peak_flops / 1e9:.1f} GFLOP/s")
    print(
        f"\n{'loss':>8} {'W':>2} {'pauses':>8} {'L':>5} {'B':>3} {'step ms':>9} {'tokens/s':>9} "
        f"{'slots/s':>9} {'model GF':>9} {'XLA GF':>9} {'%peak':>6} {'loss ms':>8} {'loss%':>6}"
    )
    for result in results:
        print_row(result, peak_flops)
    check_targets(results)


if __name__ == "__main__":
    main()
