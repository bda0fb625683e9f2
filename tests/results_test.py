"""The paper-comparison pipeline: data ratios, collapse rescues and the report, on a tiny grid."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from cyb_jax import results

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPOSITORY, "launch"))

import paper  # noqa: E402


def test_data_needed_interpolates_log_perplexity_in_log_data():
    # Perplexity 40 * data^-0.5: log-linear, so interpolation is exact.
    data = np.array([1.0, 2.0, 3.0])
    perplexity = 40.0 * data**-0.5

    needed, how = results.data_needed(data, perplexity, 40.0 * 2.5**-0.5)

    assert how == "interpolated"
    assert needed == pytest.approx(2.5, rel=1e-12)


def test_data_needed_extrapolates_beyond_the_curve():
    data = [1.0, 2.0, 3.0]
    perplexity = [40.0 * d**-0.5 for d in data]

    beyond, how_beyond = results.data_needed(data, perplexity, 40.0 * 6.0**-0.5)
    before, how_before = results.data_needed(data, perplexity, 40.0 * 0.5**-0.5)

    assert (beyond, how_beyond) == (pytest.approx(6.0, rel=1e-12), "extrapolated")
    assert (before, how_before) == (pytest.approx(0.5, rel=1e-12), "extrapolated")


def test_data_needed_infinite_on_flat_curve():
    needed, how = results.data_needed([1, 2, 3], [30.0, 30.5, 31.0], 20.0)

    assert math.isinf(needed)
    assert how.startswith("not reached")


def _record(method, regime, perplexity, pauses=0.0, beyond=""):
    passes, data = paper.REGIMES[regime]
    summary = {"eval/perplexity": perplexity, "eval/mean_pauses": pauses, "window": 4}
    return results.RunRecord(
        name=f"{method}__{regime}",
        method=method,
        label=method,
        regime=regime,
        passes=passes,
        data_multiple=data,
        workdir="",
        summary=summary,
        seconds=None,
        beyond_paper=beyond,
    )


def test_data_ratio_uses_only_one_pass_points():
    # The 2x1 point would bend the curve if it were used.
    baseline = [
        _record("ce", "1x1", 40.0),
        _record("ce", "2x1", 10.0),
        _record("ce", "1x2", 30.0),
        _record("ce", "1x3", 24.0),
    ]
    # ap at 1x2 with perplexity 24: the baseline reaches 24 at 3x, so 1.5 times the data.
    ratio, how = results.data_ratio(baseline, _record("ap", "1x2", 24.0))

    assert how == "interpolated"
    assert ratio == pytest.approx(1.5)


def test_collapse_is_only_reported_for_cyb_losses():
    assert _record("ap", "1x1", 30.0, pauses=0.01).collapsed
    assert not _record("ap", "1x1", 30.0, pauses=0.2).collapsed
    assert not _record("pause_ce_3", "1x1", 30.0, pauses=0.0).collapsed
    assert not _record("ce", "1x1", 30.0).collapsed


def _write_summary(run, pauses, steps):
    os.makedirs(run["workdir"], exist_ok=True)
    summary = {"step": steps, "eval/perplexity": 30.0, "eval/mean_pauses": pauses}
    with open(os.path.join(run["workdir"], "summary.json"), "w") as handle:
        json.dump(summary, handle)


def test_collapsed_runs_get_each_countermeasure_in_turn(tmp_path):
    scale = paper.SCALES["tiny"]
    root = str(tmp_path)
    ap, va = (paper.finetune_run(scale, root, None, method, "1x1") for method in ("ap", "va"))
    steps = ap["overrides"]["total_steps"]
    _write_summary(ap, 0.001, steps)
    _write_summary(va, 1.2, steps)

    (first,) = paper.rescue_runs(scale, root, None, [ap, va])
    assert first["name"] == "ap__1x1+aux"
    assert first["overrides"]["loss.step_ce_weight"] == 1.0
    assert "pause.input" not in first["overrides"]
    assert first["beyond_paper"] == "auxiliary per-step cross-entropy"

    _write_summary(first, 0.002, steps)
    (second,) = paper.rescue_runs(scale, root, None, [first])
    assert second["name"] == "ap__1x1+aux+token+warmup"
    assert second["overrides"]["pause.input"] == "token+code"
    assert second["overrides"]["loss.dk_warmup_steps"] == max(1, steps // 4)

    _write_summary(second, 0.003, steps)
    assert paper.rescue_runs(scale, root, None, [second]) == []


def test_extras_are_not_rescued(tmp_path):
    scale = paper.SCALES["tiny"]
    extra = paper.finetune_run(scale, str(tmp_path), None, "ap", "1x1", "token", rescue_level=None)
    _write_summary(extra, 0.001, extra["overrides"]["total_steps"])

    assert extra["overrides"]["pause.input"] == "token+code"
    assert extra["beyond_paper"] == "token-carrying pauses"
    assert paper.rescue_runs(scale, str(tmp_path), None, [extra]) == []


def test_finetuning_data_is_disjoint_from_pretraining():
    scale = paper.SCALES["laptop"]
    pretrain = paper.pretrain_run(scale, "/runs", None)["overrides"]
    largest = max(
        run["overrides"]["data.train_rows"] for run in paper.planned_runs(scale, "/runs", None)
    )

    assert (
        "data.train_rows_offset"
        not in paper.finetune_run(scale, "/runs", None, "ap", "1x3")["overrides"]
    )
    assert pretrain["data.train_rows_offset"] >= largest
    assert pretrain["total_steps"] * scale.batch_size == scale.pretrain_rows
    for run in paper.planned_runs(scale, "/runs", None):
        passes, data = paper.REGIMES[run["regime"]]
        overrides = run["overrides"]
        assert overrides["total_steps"] * scale.batch_size == passes * data * scale.base_rows
        assert overrides["init_from"] == "/runs/pretrain_ce"


# Ten tiny runs, each starting JAX and TensorFlow: a few minutes on two CPU cores.
@pytest.mark.slow
def test_tiny_pipeline_writes_the_report(tmp_path):
    root = tmp_path / "runs"
    output = tmp_path / "results.md"
    command = [
        sys.executable,
        os.path.join(REPOSITORY, "launch", "paper.py"),
        "--scale=tiny",
        f"--root={root}",
        f"--output={output}",
        f"--data_dir={tmp_path / 'tensorflow_datasets'}",
    ]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = output.read_text()
    figures = tmp_path / "results"
    for name in ("figure4.png", "figure6.png"):
        assert (figures / name).stat().st_size > 0
    for name in ("figure4.png", "figure6.png"):
        assert f"(results/{name})" in report
    scale = paper.SCALES["tiny"]
    expected_runs = (
        1 + len(scale.figure4_methods) + 3 * len(scale.figure6_methods) + len(scale.extras)
    )
    summaries = {
        path.name: json.loads((path / "summary.json").read_text())
        for path in root.iterdir()
        if (path / "summary.json").is_file()
    }
    assert len(summaries) >= expected_runs
    assert f"{len(summaries)} of {len(summaries)} runs finished;" in report
    # Each run's perplexity in the table is the one its summary.json reports.
    for name, summary in summaries.items():
        assert f"| {name} |" in report
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert f"{summary['eval/perplexity']:,.2f}" in row
    assert summaries["ap__1x3"]["tokens_seen"] == 3 * summaries["ap__1x1"]["tokens_seen"]
    assert summaries["ap__2x1"]["tokens_seen"] == 2 * summaries["ap__1x1"]["tokens_seen"]

    # A rerun trains nothing and rewrites the same tables.
    again = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished, skipped") == len(summaries)
