"""Expand an ablation grid into runs, run them one after another, and tabulate the results.

    python launch/grid.py launch/grids/figure4.py                 # run locally, then write the table
    python launch/grid.py launch/grids/figure4.py --print         # print the commands, e.g. for a cluster
    python launch/grid.py launch/grids/figure4.py --table-only    # only collect summary.json files

A grid definition is a Python file with:

    CONFIGS   {name: config file}, the experiments a grid may use
    BASE      {config field: value}, overrides for every run (e.g. a tiny model)
    GRID      a list of sub-grids; each maps an axis to its values, and every
              combination of values is a run. The axis 'config' takes names
              from CONFIGS. Any other axis is either a config field with a
              list of values ({'optimizer.learning_rate': [1e-3, 3e-3]}) or a
              name with a dict of named override sets
              ({'regime': {'1x1': {'total_steps': 40}, ...}}).
    ROOT      (optional) parent directory of the workdirs, default runs/grid_<file name>

A grid file may import modules from its own folder (launch/grids/sizes.py holds
the sizes the shipped grids share).

A run's workdir is ROOT/<config>[__<axis>=<value>...], the same for every
invocation. A run whose summary.json reports the requested total_steps is
skipped; any other run starts or resumes from its newest checkpoint.
"""

import argparse
import csv
import importlib.util
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Columns of the results table after the run name and the axis values.
RESULT_COLUMNS = (
    "step",
    "parameters",
    "eval/perplexity",
    "eval/perplexity_step_0",
    "eval/mean_pauses",
    "eval/self_paced_perplexity",
    "eval/unigram_perplexity",
)


def load_grid(path: str) -> dict[str, Any]:
    """Import a grid definition file and check its fields."""
    spec = importlib.util.spec_from_file_location("_cyb_jax_grid", path)
    module = importlib.util.module_from_spec(spec)
    # A grid file may import the modules beside it, such as launch/grids/sizes.py.
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    for field in ("CONFIGS", "GRID"):
        if not hasattr(module, field):
            raise ValueError(
                f"Grid file {path} defines no {field}; see launch/grid.py for the format."
            )
    name = os.path.splitext(os.path.basename(path))[0]
    return {
        "configs": module.CONFIGS,
        "base": getattr(module, "BASE", {}),
        "grid": module.GRID,
        "root": os.path.abspath(getattr(module, "ROOT", os.path.join("runs", f"grid_{name}"))),
    }


def _label(value: Any) -> str:
    text = format(value, "g") if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", text)


def expand(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the runs of a grid: name, config file, overrides and axis values, in definition order."""
    runs, seen = [], set()
    for sub_grid in grid["grid"]:
        if "config" not in sub_grid:
            raise ValueError(f"Sub-grid {sub_grid!r} has no 'config' axis.")
        axes = list(sub_grid)
        choices = []
        for axis in axes:
            values = sub_grid[axis]
            if isinstance(values, dict):
                choices.append([(axis, label, overrides) for label, overrides in values.items()])
            else:
                choices.append([(axis, value, None) for value in values])
        for combination in itertools.product(*choices):
            overrides = dict(grid["base"])
            axis_values = {}
            config_name = None
            parts = []
            for axis, value, named_overrides in combination:
                axis_values[axis] = value
                if axis == "config":
                    if value not in grid["configs"]:
                        raise ValueError(
                            f"Unknown config {value!r}; CONFIGS has {sorted(grid['configs'])}."
                        )
                    config_name = value
                    continue
                if named_overrides is not None:
                    overrides.update(named_overrides)
                else:
                    overrides[axis] = value
                parts.append(f"{axis.rsplit('.', 1)[-1]}={_label(value)}")
            name = "__".join([config_name, *parts])
            if name in seen:
                raise ValueError(
                    f"Two runs of the grid share the name {name!r}; make the axes differ."
                )
            seen.add(name)
            runs.append(
                {
                    "name": name,
                    "config": grid["configs"][config_name],
                    "overrides": overrides,
                    "axes": axis_values,
                    "workdir": os.path.join(grid["root"], name),
                }
            )
    return runs


def command(run: dict[str, Any], python: str = sys.executable) -> list[str]:
    """Return the cyb_jax.main command line of a run."""
    flags = [f"--config.{key}={value}" for key, value in run["overrides"].items()]
    return [
        python,
        "-m",
        "cyb_jax.main",
        f"--config={run['config']}",
        f"--workdir={run['workdir']}",
        *flags,
    ]


def requested_steps(run: dict[str, Any]) -> int:
    """Return total_steps of a run: its override, or the config file's value."""
    if "total_steps" in run["overrides"]:
        return int(run["overrides"]["total_steps"])
    from cyb_jax import configuration

    if REPOSITORY not in sys.path:
        sys.path.insert(0, REPOSITORY)
    return int(configuration.load_config_file(os.path.join(REPOSITORY, run["config"])).total_steps)


def read_summary(run: dict[str, Any]) -> dict[str, Any] | None:
    path = os.path.join(run["workdir"], "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def is_finished(run: dict[str, Any]) -> bool:
    summary = read_summary(run)
    return summary is not None and summary.get("step") == requested_steps(run)


def train(runs: list[dict[str, Any]], record_seconds=None) -> list[str]:
    """Run every unfinished run one after another; return the names of those that failed.

    `record_seconds(name, seconds)`, when given, receives each run's wall time.
    """
    failed = []
    for index, run in enumerate(runs, 1):
        prefix = f"[{index}/{len(runs)}] {run['name']}"
        if is_finished(run):
            print(f"{prefix}: finished, skipped", flush=True)
            continue
        print(f"{prefix}: running in {run['workdir']}", flush=True)
        start = time.time()
        result = subprocess.run(command(run), cwd=REPOSITORY)
        if record_seconds is not None:
            record_seconds(run["name"], time.time() - start)
        if result.returncode:
            print(f"{prefix}: failed with exit status {result.returncode}", flush=True)
            failed.append(run["name"])
    return failed


def write_tables(runs: list[dict[str, Any]], root: str) -> tuple[str, str]:
    """Write results.csv and results.md under `root` with one row per run; return their paths."""
    axes = []
    for run in runs:
        axes.extend(axis for axis in run["axes"] if axis not in axes)
    header = ["run", *axes, *RESULT_COLUMNS]
    rows = []
    for run in runs:
        summary = read_summary(run) or {}
        row = [run["name"], *(run["axes"].get(axis, "") for axis in axes)]
        for column in RESULT_COLUMNS:
            value = summary.get(column, "")
            row.append(f"{value:.4f}" if isinstance(value, float) else value)
        rows.append(row)
    os.makedirs(root, exist_ok=True)
    csv_path = os.path.join(root, "results.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    markdown_path = os.path.join(root, "results.md")
    with open(markdown_path, "w", encoding="utf-8") as handle:
        handle.write("| " + " | ".join(header) + " |\n")
        handle.write("|" + " --- |" * len(header) + "\n")
        for row in rows:
            handle.write(
                "| " + " | ".join(str(cell) if cell != "" else "–" for cell in row) + " |\n"
            )
    return csv_path, markdown_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grid", help="grid definition file, e.g. launch/grids/figure4.py")
    parser.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="print the commands instead of running them",
    )
    parser.add_argument("--table-only", action="store_true", help="only write the results table")
    parser.add_argument(
        "--root", help="parent directory of the workdirs (default: the grid's ROOT)"
    )
    arguments = parser.parse_args(argv)

    if not os.path.isfile(arguments.grid):
        parser.error(f"grid file {arguments.grid!r} not found")
    grid = load_grid(arguments.grid)
    if arguments.root:
        grid["root"] = os.path.abspath(arguments.root)
    runs = expand(grid)

    if arguments.print_only:
        for run in runs:
            print(shlex.join(command(run, "python")))
        return 0
    failed = []
    if not arguments.table_only:
        failed = train(runs)
    csv_path, markdown_path = write_tables(runs, grid["root"])
    print(f"Results: {csv_path} and {markdown_path}")
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
