"""Reproduce the CYB paper's comparisons (Figures 4 and 6) at laptop scale, from one command.

    python launch/paper.py                    # run or resume every run, then write docs/results.md
    python launch/paper.py --report-only      # rewrite docs/results.md from the runs on disk
    python launch/paper.py --print            # print the training commands

As in the CYB paper (Galashov et al. 2025, arXiv:2510.13879), a `ce` model is
pretrained first; every method is then fine-tuned from its checkpoint
(config.init_from, parameters only: pause embeddings and the DK output keep their
fresh init, with the DK prior psi = 0.9) on the same data in the same order:

- Figure 4, one pass over the base budget (regime 1x1): no pauses (`ce`),
  `pause_ce` with 1, 2 and 3 pauses, CYB-AP (omega = 0:0:0:1, gamma = 1), CYB-VA
  and CYB-DP with visible pauses as in the CYB paper, and CYB-AP with private
  pauses (not in the CYB paper).
- Figure 6, regimes 2x1, 1x2 and 1x3 for `ce`, `pause_ce` with 3 pauses and CYB-AP.

The pretraining rows and the fine-tuning rows are disjoint parts of the training
split (data.train_rows_offset). A CYB run that collapses to no pauses is rerun
with the countermeasures of the README's "Pauses must be used", first the auxiliary per-step
cross-entropy, then also token-carrying pauses and a DK warm-up. A scale may also
list extras: 1x1 runs with one of those changes whatever the results. Both kinds
are labelled as beyond the CYB paper. Finally the best CYB model of regime 1x1
is analysed (python -m cyb_jax.analyze) and the report is written.

Every run has a fixed workdir under --root, so the command can be stopped and
rerun: finished runs are skipped and the others resume from their checkpoints.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
from typing import Any

import grid as grid_lib

REPOSITORY = grid_lib.REPOSITORY
if REPOSITORY not in sys.path:
    sys.path.insert(0, REPOSITORY)

from cyb_jax import results  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Scale:
    """Model, data budget and methods of one size of the comparison."""

    model: dict[str, Any]
    seq_len: int
    batch_size: int
    base_rows: int  # the base fine-tuning budget D, in packed rows of seq_len tokens
    pretrain_rows: int  # pretraining rows, placed after the largest fine-tuning budget
    pretrain_learning_rate: float
    learning_rate: float  # peak learning rate of fine-tuning
    warmup_steps: int
    eval_max_batches: int
    analysis_max_batches: int
    figure4_methods: tuple[str, ...]
    figure6_methods: tuple[str, ...]
    # (method, tweak) runs of regime 1x1 beyond the CYB paper, tried whatever the results.
    extras: tuple[tuple[str, str], ...] = ()
    checkpoint_every: int = 100
    log_every: int = 25


SCALES = {
    # About an hour on two CPU cores (the report states the measured time of every run).
    "laptop": Scale(
        model={
            "model.num_layers": 2,
            "model.d_model": 64,
            "model.num_heads": 4,
            "model.mlp_dim": 192,
        },
        seq_len=64,
        batch_size=16,
        base_rows=3200,
        pretrain_rows=19_200,
        pretrain_learning_rate=3e-3,
        learning_rate=1e-3,
        warmup_steps=20,
        eval_max_batches=-1,
        analysis_max_batches=-1,
        figure4_methods=(
            "ce",
            "pause_ce_1",
            "pause_ce_2",
            "pause_ce_3",
            "ap",
            "va",
            "dp",
            "ap_private",
        ),
        figure6_methods=("ce", "pause_ce_3", "ap"),
        extras=(("ap", "aux"), ("ap", "token"), ("ap", "warmup"), ("pause_ce_3", "token")),
    ),
    # Seconds per run: for the pipeline test.
    "tiny": Scale(
        model={
            "model.num_layers": 1,
            "model.d_model": 16,
            "model.num_heads": 2,
            "model.mlp_dim": 32,
        },
        seq_len=16,
        batch_size=4,
        base_rows=8,
        pretrain_rows=16,
        pretrain_learning_rate=3e-3,
        learning_rate=1e-3,
        warmup_steps=1,
        eval_max_batches=2,
        analysis_max_batches=2,
        figure4_methods=("ce", "pause_ce_3", "ap"),
        figure6_methods=("ce", "ap"),
        extras=(("ap", "token"),),
        checkpoint_every=4,
        log_every=2,
    ),
}

# Method -> (config file, label, overrides). The CYB configs switch on the
# countermeasures of base.use_pause_countermeasures; the CYB paper's recipe keeps
# only the DK prior, so the auxiliary cross-entropy is switched off here.
PAPER_CYB = {"loss.step_ce_weight": 0.0, "model.dk_prior": 0.9}
METHODS = {
    "ce": ("configs/ce.py", "no pauses (ce)", {}),
    "pause_ce_1": ("configs/pause_ce.py", "pause_ce, 1 pause", {"pause.window": 2}),
    "pause_ce_2": ("configs/pause_ce.py", "pause_ce, 2 pauses", {"pause.window": 3}),
    "pause_ce_3": ("configs/pause_ce.py", "pause_ce, 3 pauses", {"pause.window": 4}),
    "ap": ("configs/ap.py", "CYB-AP", {**PAPER_CYB, "loss.world_stop": "0:0:0:1"}),
    "va": ("configs/va.py", "CYB-VA", {**PAPER_CYB, "loss.prior": "1:1:1:1"}),
    "dp": ("configs/dp.py", "CYB-DP", {**PAPER_CYB, "loss.prior": "1:1:1:1", "loss.alpha": 0.01}),
    "ap_private": (
        "configs/ap.py",
        "CYB-AP, private pauses",
        {**PAPER_CYB, "loss.world_stop": "0:0:0:1", "model.pause_visibility": "private"},
    ),
}
# Beyond the CYB paper: what a method adds to its recipe, as the report names it.
BEYOND_PAPER = {"ap_private": "private pause attention"}
# Regime -> (passes P, data multiple D).
REGIMES = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2), "1x3": (1, 3)}
# Changes beyond the CYB paper (README, "Pauses must be used"): name -> (description, overrides
# as a function of the run's total steps).
TWEAKS = {
    "aux": ("auxiliary per-step cross-entropy", lambda steps: {"loss.step_ce_weight": 1.0}),
    "token": ("token-carrying pauses", lambda steps: {"pause.input": "token+code"}),
    "warmup": ("DK warm-up", lambda steps: {"loss.dk_warmup_steps": max(1, steps // 4)}),
    "aux+token+warmup": (
        "auxiliary per-step cross-entropy, token-carrying pauses, DK warm-up",
        lambda steps: {
            "loss.step_ce_weight": 1.0,
            "pause.input": "token+code",
            "loss.dk_warmup_steps": max(1, steps // 4),
        },
    ),
}
# Countermeasures against a collapse to no pauses, tried in this order.
RESCUES = ("aux", "aux+token+warmup")


def _common(scale: Scale, data_dir: str | None) -> dict[str, Any]:
    common = {
        **scale.model,
        "data.seq_len": scale.seq_len,
        "data.batch_size": scale.batch_size,
        "data.eval_max_batches": scale.eval_max_batches,
        "checkpoint_every": scale.checkpoint_every,
        "log_every": scale.log_every,
    }
    if data_dir:
        common["data.data_dir"] = data_dir
    return common


def pretrain_run(scale: Scale, root: str, data_dir: str | None) -> dict[str, Any]:
    steps = scale.pretrain_rows // scale.batch_size
    largest = max(data for _, data in REGIMES.values())
    overrides = {
        **_common(scale, data_dir),
        "data.train_rows": scale.pretrain_rows,
        "data.train_rows_offset": largest * scale.base_rows,
        "total_steps": steps,
        "eval_every": steps,
        "optimizer.learning_rate": scale.pretrain_learning_rate,
    }
    return _run(
        "pretrain_ce",
        "configs/ce.py",
        overrides,
        root,
        method="ce",
        label="pretrained ce",
        regime="pretrain",
    )


def _run(name, config, overrides, root, **fields) -> dict[str, Any]:
    return {
        "name": name,
        "config": config,
        "overrides": overrides,
        "axes": {},
        "workdir": os.path.join(root, name),
        **fields,
    }


def finetune_run(
    scale: Scale,
    root: str,
    data_dir: str | None,
    method: str,
    regime: str,
    tweak: str | None = None,
    rescue_level: int | None = 0,
) -> dict[str, Any]:
    """Return a fine-tuning run; `tweak` names an entry of TWEAKS added to its method.

    `rescue_level` counts the countermeasures already tried on the run's line
    (0 for a planned run); None marks a run that is never rescued.
    """
    passes, data = REGIMES[regime]
    steps = passes * data * scale.base_rows // scale.batch_size
    config, label, method_overrides = METHODS[method]
    overrides = {
        **_common(scale, data_dir),
        **method_overrides,
        "data.train_rows": data * scale.base_rows,
        "total_steps": steps,
        "eval_every": steps,
        "init_from": os.path.join(root, "pretrain_ce"),
        "optimizer.learning_rate": scale.learning_rate,
        "optimizer.warmup_steps": scale.warmup_steps,
    }
    name = f"{method}__{regime}"
    beyond = BEYOND_PAPER.get(method, "")
    if tweak is not None:
        description, make_overrides = TWEAKS[tweak]
        overrides.update(make_overrides(steps))
        name = f"{name}+{tweak}"
        label = f"{label} + {tweak}"
        beyond = ", ".join(part for part in (beyond, description) if part)
    return _run(
        name,
        config,
        overrides,
        root,
        method=method,
        label=label,
        regime=regime,
        beyond_paper=beyond,
        rescue_level=rescue_level,
    )


def planned_runs(scale: Scale, root: str, data_dir: str | None) -> list[dict[str, Any]]:
    """Return the fine-tuning runs of Figures 4 and 6 and the extras, in running order."""
    runs = [finetune_run(scale, root, data_dir, method, "1x1") for method in scale.figure4_methods]
    for regime in ("2x1", "1x2", "1x3"):
        runs += [
            finetune_run(scale, root, data_dir, method, regime) for method in scale.figure6_methods
        ]
    runs += [
        finetune_run(scale, root, data_dir, method, "1x1", tweak, rescue_level=None)
        for method, tweak in scale.extras
    ]
    return runs


def rescue_runs(scale: Scale, root: str, data_dir: str | None, runs: list[dict[str, Any]]):
    """Return the next countermeasure run of every collapsed CYB run not yet fully rescued.

    A run is collapsed when its summary reports fewer expected pauses than
    objective.COLLAPSE_PAUSES; its first rescue adds RESCUES[0], the rescue of that
    rescue RESCUES[1], and so on. Extras (rescue_level None) are not rescued.
    """
    pending = []
    for run in runs:
        level = run.get("rescue_level")
        if level is None or level >= len(RESCUES) or not _record(run, {}).collapsed:
            continue
        pending.append(
            finetune_run(
                scale, root, data_dir, run["method"], run["regime"], RESCUES[level], level + 1
            )
        )
    return pending


def _record(run: dict[str, Any], timings: dict[str, float]) -> results.RunRecord:
    passes, data = REGIMES.get(run["regime"], (1, 0))
    return results.RunRecord(
        name=run["name"],
        method=run["method"],
        label=run["label"],
        regime=run["regime"],
        passes=passes,
        data_multiple=data,
        workdir=run["workdir"],
        summary=grid_lib.read_summary(run) if grid_lib.is_finished(run) else None,
        seconds=timings.get(run["name"]),
        beyond_paper=run.get("beyond_paper", ""),
    )


class Timings:
    """Wall seconds of each run's processes, summed over restarts, kept in ROOT/timings.json."""

    def __init__(self, root: str):
        self.path = os.path.join(root, "timings.json")
        self.seconds: dict[str, float] = {}
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as handle:
                self.seconds = json.load(handle)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(self.seconds, handle, indent=1)
        os.replace(temporary, self.path)


def train(runs: list[dict[str, Any]], timings: Timings) -> list[str]:
    """Run every unfinished run one after another; return the names of those that failed."""
    return grid_lib.train(runs, timings.add)


def best_cyb_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the finished, non-collapsed CYB run of regime 1x1 with the lowest perplexity."""
    candidates = [
        (_record(run, {}).perplexity, run)
        for run in runs
        if run["regime"] == "1x1" and results.is_cyb(run["method"])
    ]
    candidates = [
        (value, run)
        for value, run in candidates
        if not math.isnan(value) and not _record(run, {}).collapsed
    ]
    return min(candidates, key=lambda pair: pair[0])[1] if candidates else None


def analyse(run: dict[str, Any], max_batches: int) -> tuple[dict[str, Any], str]:
    """Run python -m cyb_jax.analyze on a workdir unless its analysis is newer than its summary."""
    analysis_dir = os.path.join(run["workdir"], "analysis")
    numbers_path = os.path.join(analysis_dir, "numbers.json")
    summary_path = os.path.join(run["workdir"], "summary.json")
    if not (
        os.path.isfile(numbers_path)
        and os.path.getmtime(numbers_path) >= os.path.getmtime(summary_path)
    ):
        command = [sys.executable, "-m", "cyb_jax.analyze", run["workdir"], "--passages=2"]
        if max_batches > 0:
            command.append(f"--max_batches={max_batches}")
        print(f"Analysing {run['name']}: {shlex.join(command[1:])}", flush=True)
        subprocess.run(command, cwd=REPOSITORY, check=True)
    with open(numbers_path, encoding="utf-8") as handle:
        return json.load(handle), analysis_dir


def _commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def write_report(scale_name, scale, root, pretrain, runs, timings, output, arguments) -> str:
    records = [_record(run, timings.seconds) for run in runs]
    pretrained = _record(pretrain, timings.seconds)
    best = best_cyb_run(runs)
    analysis, analysis_dir = (None, None)
    if best is not None:
        analysis, analysis_dir = analyse(best, scale.analysis_max_batches)
    parameters = pretrained.value("parameters")
    model = ", ".join(f"{key.split('.')[-1]} {value}" for key, value in scale.model.items())
    tokens = scale.base_rows * scale.seq_len
    setup = {
        "scale": f"`--scale={scale_name}`",
        "model": f"{model}; {parameters:,.0f} parameters without pauses"
        if not math.isnan(parameters)
        else model,
        "sequence, batch": f"{scale.seq_len} real tokens per row, {scale.batch_size} rows per step",
        "pretraining": f"`ce`, one pass over {scale.pretrain_rows:,} rows "
        f"({scale.pretrain_rows * scale.seq_len:,} tokens), peak learning rate {scale.pretrain_learning_rate:g}",
        "base fine-tuning budget D": f"{scale.base_rows:,} rows ({tokens:,} tokens), disjoint from the "
        "pretraining rows; 1xk reads k times as many rows once, 2x1 reads D twice",
        "fine-tuning": f"parameters from the pretrained model, fresh AdamW state, peak learning rate "
        f"{scale.learning_rate:g} after {scale.warmup_steps} warm-up steps, cosine decay to 0.1x",
        "evaluation": "the validation split (twelfth-night, julius-caesar)"
        + ("" if scale.eval_max_batches < 0 else f", first {scale.eval_max_batches} batches"),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no accelerator; "
        f"Python {platform.python_version()}",
        "code": f"report written at commit {_commit()}",
    }
    flags = "" if scale_name == "laptop" else f" --scale={scale_name}"
    if arguments.root_given:
        flags += f" --root={arguments.root_given}"
    commands = [
        f"python launch/paper.py{flags}                # train what is missing, then write this report",
        f"python launch/paper.py{flags} --report-only  # rewrite the report from the runs on disk",
    ]
    if best is not None:
        commands.append(f"python -m cyb_jax.analyze {os.path.relpath(best['workdir'], REPOSITORY)}")
    results.write_report(
        records,
        pretrained,
        setup=setup,
        commands=commands,
        analysis=analysis,
        analysis_dir=analysis_dir,
        output=output,
    )
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", choices=sorted(SCALES), default="laptop", help="model and data sizes"
    )
    parser.add_argument(
        "--root", help="parent directory of the workdirs (default: runs/paper_<scale>)"
    )
    parser.add_argument(
        "--output",
        help="report path (default: docs/results.md for --scale=laptop, ROOT/results.md otherwise)",
    )
    parser.add_argument(
        "--data_dir", help="TFDS data directory passed to every run as data.data_dir"
    )
    parser.add_argument(
        "--print", dest="print_only", action="store_true", help="print the training commands"
    )
    parser.add_argument("--report-only", action="store_true", help="only write the report")
    arguments = parser.parse_args(argv)

    scale = SCALES[arguments.scale]
    arguments.root_given = arguments.root
    root = os.path.abspath(
        arguments.root or os.path.join(REPOSITORY, "runs", f"paper_{arguments.scale}")
    )
    output = arguments.output or (
        os.path.join(REPOSITORY, "docs", "results.md")
        if arguments.scale == "laptop"
        else os.path.join(root, "results.md")
    )
    pretrain = pretrain_run(scale, root, arguments.data_dir)
    runs = planned_runs(scale, root, arguments.data_dir)

    if arguments.print_only:
        for run in [pretrain, *runs]:
            print(shlex.join(grid_lib.command(run, "python")))
        print(
            "# then, for every CYB run that collapses to no pauses, its rerun with countermeasures"
        )
        return 0

    timings = Timings(root)
    failed = []
    if not arguments.report_only:
        failed = train([pretrain], timings)
        if failed:
            print("Pretraining failed; rerun the same command to resume it.", file=sys.stderr)
            return 1
        failed = train(runs, timings)
    # Rescues are decided from finished runs, so a rerun makes the same decisions.
    pending = rescue_runs(scale, root, arguments.data_dir, runs)
    while pending:
        # A rescue may be a planned extra already (the same name and overrides).
        names = {run["name"] for run in runs}
        pending = [run for run in pending if run["name"] not in names]
        runs += pending
        if not arguments.report_only:
            failed += train(pending, timings)
        pending = rescue_runs(scale, root, arguments.data_dir, pending)
    write_report(arguments.scale, scale, root, pretrain, runs, timings, output, arguments)
    print(f"Report: {output}")
    if failed:
        print(
            f"Failed runs: {', '.join(failed)}; rerun the same command to resume them.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    # Piped into `head`, stop quietly when the reader closes the pipe.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
