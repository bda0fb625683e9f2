"""Compare the train step's memory and time with the full-logits head and the chunked head.

Run from the repository root:

    python -m bench.head_memory
    python -m bench.head_memory --chunks 0,512 --vocab 32768 --no-time

Memory comes from the compiled executable's `memory_analysis()`, which is XLA's
static buffer assignment, not a measurement of the running process. On the CPU
backend of jax 0.10.2 it reports `temp_size_in_bytes` (intermediate buffers,
including everything saved for the backward pass) and the argument, output and
alias sizes. Its `peak_memory_in_bytes` is printed too, but there it does not
grow with the logits, so the target compares the step's total instead:
arguments + outputs - aliased (the donated state) + temporaries.
"""

import argparse

from bench import common

MEMORY_CUT_TARGET = 0.30


def step_memory(case: common.TrainCase) -> dict[str, int]:
    """Byte counts of the compiled train step, from XLA's buffer assignment."""
    compiled = case.step_fn.lower(case.state, case.batch).compile()
    stats = compiled.memory_analysis()
    temp = stats.temp_size_in_bytes
    arguments = stats.argument_size_in_bytes
    outputs = stats.output_size_in_bytes
    aliased = stats.alias_size_in_bytes
    return {
        "arguments": arguments,
        "temp": temp,
        "total": arguments + outputs - aliased + temp,
        "reported_peak": getattr(stats, "peak_memory_in_bytes", 0) or 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--chunks", default="0,256,1024,4096", help="head_chunk values; 0 is the full-logits head"
    )
    parser.add_argument("--loss", default="ap", help="loss name: ce, pause_ce or ap")
    parser.add_argument("--window", type=int, default=4, help="slots per token W")
    parser.add_argument("--visibility", default="private", help="pause visibility mode")
    parser.add_argument("--seq-len", type=int, default=256, help="real tokens L per row")
    common.ModelSize.add_arguments(parser, vocab=32768, repeats=3)
    parser.add_argument("--no-time", action="store_true", help="report memory only")
    args = parser.parse_args()

    size = common.ModelSize.from_arguments(args)
    chunks = [int(part) for part in args.chunks.split(",")]
    if chunks[0] != 0:
        raise ValueError(f"--chunks must start with 0, the full-logits head, got {args.chunks}")
    print(f"Machine: {common.describe_machine()}")
    print(f"Model: {size.describe()}")
    print(f"Case: loss={args.loss} W={args.window} pauses={args.visibility} seq_len={args.seq_len}")
    slots = args.tokens_per_batch * args.window
    logits_bytes = slots * (args.vocab + 1) * 4
    print(f"Full float32 logits [B, L * W, V + 1]: {logits_bytes / 2**20:.1f} MiB")
    print(
        "MiB from compiled.memory_analysis(): temp = temp_size_in_bytes; total = arguments "
        "+ outputs - aliased + temp\n"
    )
    memories, runners = {}, []
    for head_chunk in chunks:
        config = common.run_config(
            args.loss, args.window, args.visibility, args.seq_len, size, head_chunk
        )
        case = common.build_train_case(config)
        memories[head_chunk] = step_memory(case)
        if not args.no_time:
            runner = common.make_step_runner(case)
            runner()
            runners.append(runner)
    # Interleaved rounds expose every head to the same background load.
    seconds = common.time_round_robin(runners, args.repeats) if runners else []

    print(f"{'head_chunk':>10} {'temp MiB':>10} {'total MiB':>10} {'vs full':>8} {'step ms':>9}")
    totals = {head_chunk: memory["total"] for head_chunk, memory in memories.items()}
    for index, head_chunk in enumerate(chunks):
        memory = memories[head_chunk]
        step = f"{seconds[index] * 1e3:9.0f}" if seconds else ""
        print(
            f"{head_chunk:>10} {memory['temp'] / 2**20:10.1f} {memory['total'] / 2**20:10.1f} "
            f"{memory['total'] / totals[0]:8.2f} {step}"
        )
    peaks = {memory["reported_peak"] for memory in memories.values()}
    arguments = {memory["arguments"] for memory in memories.values()}
    print(
        "peak_memory_in_bytes for every head: "
        + ", ".join(f"{peak / 2**20:.1f}" for peak in sorted(peaks))
        + " MiB; argument_size_in_bytes: "
        + ", ".join(f"{size / 2**20:.1f}" for size in sorted(arguments))
        + " MiB"
    )

    print("\nTarget")
    for head_chunk in chunks[1:]:
        cut = 1.0 - totals[head_chunk] / totals[0]
        verdict = "PASS" if cut >= MEMORY_CUT_TARGET else "FAIL"
        print(
            f"  {verdict}  head_chunk={head_chunk} cuts the step's total memory by "
            f"{100 * cut:.1f}% (target >= {100 * MEMORY_CUT_TARGET:.0f}%)"
        )


if __name__ == "__main__":
    main()
