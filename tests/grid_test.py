"""The ablation grid runner: expansion, names, skipping finished runs and the results table."""

import csv
import os
import subprocess
import sys

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPOSITORY, "launch"))

import grid as grid_lib  # noqa: E402

TINY_GRID = '''
CONFIGS = {{"ce": "configs/ce.py", "ap": "configs/ap.py"}}
BASE = {{
    "data.data_dir": {data_dir!r},
    "data.seq_len": 16,
    "data.batch_size": 4,
    "data.eval_max_batches": 1,
    "model.num_layers": 1,
    "model.d_model": 16,
    "model.num_heads": 2,
    "model.mlp_dim": 32,
    "pause.window": 1,
    "total_steps": 2,
    "eval_every": 2,
    "checkpoint_every": 2,
    "log_every": 1,
    "optimizer.warmup_steps": 1,
}}
GRID = [
    {{"config": ["ce"], "optimizer.learning_rate": [0.001, 0.003]}},
    {{"config": ["ap"], "regime": {{"short": {{"total_steps": 2}}, "long": {{"total_steps": 3, "eval_every": 3}}}}}},
]
'''


def _write_grid(tmp_path, data_dir):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_GRID.format(data_dir=data_dir))
    return str(path)


def _grid_command(path, root, *extra):
    return [sys.executable, os.path.join(REPOSITORY, "launch", "grid.py"), path, f"--root={root}", *extra]


def test_expand_names_runs_stably(tmp_path):
    grid = grid_lib.load_grid(_write_grid(tmp_path, "unused"))
    grid["root"] = "/runs/tiny"
    runs = grid_lib.expand(grid)
    assert [run["name"] for run in runs] == [
        "ce__learning_rate=0.001",
        "ce__learning_rate=0.003",
        "ap__regime=short",
        "ap__regime=long",
    ]
    assert runs[1]["overrides"]["optimizer.learning_rate"] == 0.003
    assert runs[3]["overrides"]["total_steps"] == 3
    assert runs[3]["workdir"] == "/runs/tiny/ap__regime=long"
    assert grid_lib.requested_steps(runs[3]) == 3


def test_unknown_config_name_is_rejected(tmp_path):
    grid = grid_lib.load_grid(_write_grid(tmp_path, "unused"))
    grid["grid"] = [{"config": ["va"]}]
    with pytest.raises(ValueError, match="Unknown config 'va'"):
        grid_lib.expand(grid)


@pytest.mark.parametrize("name", ["figure4.py", "figure5.py", "figure6.py"])
def test_shipped_grids_print_commands(name):
    result = subprocess.run(
        [sys.executable, os.path.join(REPOSITORY, "launch", "grid.py"), f"launch/grids/{name}", "--print"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert {"figure4.py": 5, "figure5.py": 12, "figure6.py": 12}[name] == len(lines)
    assert all(line.startswith("python -m cyb_jax.main --config=configs/") for line in lines)


# About three minutes on two CPU cores: four runs, each starting JAX and TensorFlow.
@pytest.mark.slow
def test_tiny_grid_runs_and_tabulates(tmp_path):
    path = _write_grid(tmp_path, str(tmp_path / "tensorflow_datasets"))
    root = str(tmp_path / "runs")
    result = subprocess.run(
        _grid_command(path, root), cwd=REPOSITORY, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(os.path.join(root, "results.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run"] for row in rows] == [
        "ce__learning_rate=0.001",
        "ce__learning_rate=0.003",
        "ap__regime=short",
        "ap__regime=long",
    ]
    assert [row["step"] for row in rows] == ["2", "2", "2", "3"]
    assert all(float(row["eval/perplexity"]) > 1.0 for row in rows)
    with open(os.path.join(root, "results.md")) as handle:
        markdown = handle.read()
    assert markdown.startswith("| run | config | optimizer.learning_rate | regime | step |")
    assert markdown.count("\n") == 2 + 4

    # A second invocation skips every finished run.
    again = subprocess.run(
        _grid_command(path, root), cwd=REPOSITORY, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished, skipped") == 4
