"""The report of the paper comparisons: tables, figures and data-efficiency ratios.

`launch/paper.py` trains the runs; `write_report` turns their workdirs into
docs/results.md. Each run is described by a `RunRecord`: its method (a row of
the CYB paper's Figure 4, "the CYB paper" being Galashov et al. 2025,
arXiv:2510.13879), its data regime (Figure 6) and the contents of its summary.json.
"""

import dataclasses
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cyb_jax import objective as objective_lib
from cyb_jax import plots
from cyb_jax import report

# Read-out perplexities of the CYB paper's Figure 4 (Gemma-1 2B fine-tuned on C4).
PAPER_FIGURE4 = {
    "pretrained": 13.02,
    "ce": 12.17,
    "pause_ce_1": 12.10,
    "pause_ce_2": 12.02,
    "pause_ce_3": 11.98,
    "ap": 11.66,
    "va": 12.37,
    "dp": 11.67,
}
# How many times the data of CYB-AP the CYB paper's baselines need to match it (Figure 6).
PAPER_DATA_RATIOS = {"ce": 3.0, "pause_ce_3": 2.0}
# A pause model whose every pause step has a perplexity above this multiple of step 0's
# is reported as leaving its pause steps untrained.
UNTRAINED_STEP_RATIO = 2.0
# An extrapolated data ratio beyond this multiple of the largest measured budget is
# reported only as "more than" that budget.
EXTRAPOLATION_LIMIT = 2.0


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One finished (or unfinished) run of the comparison."""

    name: str
    method: str  # a key of the method table, e.g. 'ap' or 'pause_ce_3'
    label: str  # how figures and tables name the method
    regime: str  # '1x1', '2x1', '1x2', '1x3', or 'pretrain'
    passes: int
    data_multiple: int  # the regime's data as a multiple of the base budget
    workdir: str
    summary: Mapping[str, Any] | None
    seconds: float | None  # wall time of the run's processes, summed over restarts
    beyond_paper: str = ""  # the countermeasures this run adds to the CYB paper's recipe

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def value(self, key: str, default: float = math.nan) -> float:
        if self.summary is None or key not in self.summary:
            return default
        return float(self.summary[key])

    @property
    def perplexity(self) -> float:
        return self.value("eval/perplexity")

    @property
    def mean_pauses(self) -> float:
        return self.value("eval/mean_pauses", 0.0)

    @property
    def series(self) -> str:
        """The method, and what the run adds beyond the CYB paper: one line of Figure 6."""
        return f"{self.method}+{self.beyond_paper}" if self.beyond_paper else self.method

    @property
    def collapsed(self) -> bool:
        """Whether a CYB run ended with (almost) no pauses."""
        return (
            is_cyb(self.method)
            and self.finished
            and self.mean_pauses < objective_lib.COLLAPSE_PAUSES
        )


def is_cyb(method: str) -> bool:
    return method.split("_")[0] in ("ap", "va", "dp")


def data_needed(
    tokens: Sequence[float], perplexities: Sequence[float], target: float
) -> tuple[float, str]:
    """Return the data a method needs to reach `target` perplexity, and how it was found.

    Log perplexity is interpolated linearly in log data between the method's
    one-pass points (more data is assumed to help; points are sorted by data).
    A target outside the measured range is extrapolated along the nearest
    segment, and the second value is 'extrapolated' instead of 'interpolated'.
    """
    if len(tokens) < 2:
        raise ValueError("Interpolating a data curve needs at least two points.")
    order = np.argsort(tokens)
    x = np.log(np.asarray(tokens, np.float64)[order])
    y = np.log(np.asarray(perplexities, np.float64)[order])
    goal = math.log(target)
    for i in range(len(x) - 1):
        low, high = sorted((y[i], y[i + 1]))
        if low <= goal <= high and y[i] != y[i + 1]:
            fraction = (goal - y[i]) / (y[i + 1] - y[i])
            return float(math.exp(x[i] + fraction * (x[i + 1] - x[i]))), "interpolated"
    # Extrapolate along the segment at the end the target lies beyond.
    i = len(x) - 2 if goal < y[-1] else 0
    slope = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
    if slope >= 0:
        return math.inf, "not reached: more data did not lower the perplexity"
    return float(math.exp(x[i] + (goal - y[i]) / slope)), "extrapolated"


def data_ratio(baseline: Sequence[RunRecord], reference: RunRecord) -> tuple[float, str] | None:
    """Return how many times the data of `reference` the baseline needs to match it."""
    points = [run for run in baseline if run.passes == 1 and run.finished]
    if len(points) < 2 or not reference.finished:
        return None
    tokens = [run.data_multiple for run in points]
    needed, how = data_needed(tokens, [run.perplexity for run in points], reference.perplexity)
    return needed / reference.data_multiple, how


def _format(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _pauses_cell(run: RunRecord) -> str:
    if not run.finished:
        return "–"
    if run.collapsed:
        return f"{run.mean_pauses:.3f} (collapsed)"
    return f"{run.mean_pauses:.3f}"


def _minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f}"


def write_report(
    runs: Sequence[RunRecord],
    pretrained: RunRecord,
    *,
    setup: Mapping[str, Any],
    commands: Sequence[str],
    analysis: Mapping[str, Any] | None,
    analysis_dir: str | None,
    output: str,
) -> str:
    """Write the results report to `output` and its figures beside it; return the report text.

    `setup` describes the scale (model, data budget, machine; shown as a table),
    `commands` regenerate everything, and `analysis` is the numbers.json that
    `python -m cyb_jax.analyze` wrote for the best CYB run in `analysis_dir`.
    """
    figure_dir = os.path.splitext(output)[0]
    os.makedirs(figure_dir, exist_ok=True)
    figure_link = os.path.basename(figure_dir)
    by_regime: dict[str, list[RunRecord]] = {}
    for run in runs:
        by_regime.setdefault(run.regime, []).append(run)
    one_by_one = [run for run in by_regime.get("1x1", []) if run.finished]

    sections = [
        "# Results: the CYB paper's comparisons at laptop scale",
        "",
        "Generated by `python launch/paper.py` from the runs it made; do not edit by hand. "
        "The CYB paper is Galashov et al. 2025, arXiv:2510.13879; its numbers come from "
        "Gemma-1 2B fine-tuned on C4, ours from a small model fine-tuned on Shakespeare, so "
        "only the order of the methods and the data ratios are comparable, not the perplexities.",
        "",
        "## Setup",
        "",
        _table(["", ""], [(key, value) for key, value in setup.items()]),
        "",
    ]

    # Figure 4.
    bars = [("pretrained, not fine-tuned", pretrained.perplexity)] if pretrained.finished else []
    bars += [(run.label, run.perplexity) for run in one_by_one]
    if bars:
        plots.perplexity_bars(
            [label for label, _ in bars],
            [value for _, value in bars],
            "Validation perplexity after one pass over the fine-tuning data (1x1)",
            os.path.join(figure_dir, "figure4.png"),
        )
    rows = []
    if pretrained.finished:
        rows.append(
            (
                "pretrained, not fine-tuned",
                _format(pretrained.perplexity),
                "–",
                "–",
                _format(PAPER_FIGURE4["pretrained"]),
            )
        )
    for run in one_by_one:
        steps = [
            _format(run.value(f"eval/perplexity_step_{i}"))
            for i in range(int(run.value("window", 1)))
        ]
        paper = None if run.beyond_paper else PAPER_FIGURE4.get(run.method)
        rows.append(
            (
                run.label + (f" ({run.beyond_paper})" if run.beyond_paper else ""),
                _format(run.perplexity),
                " / ".join(steps),
                _pauses_cell(run),
                _format(paper) if paper else "–",
            )
        )
    sections += [
        "## Figure 4: perplexity by method, equal data",
        "",
        f"![Figure 4]({figure_link}/figure4.png)" if bars else "No run of regime 1x1 has finished.",
        "",
        _table(
            [
                "method",
                "perplexity",
                "perplexity at each step",
                "mean pauses per token",
                "CYB paper",
            ],
            rows,
        ),
        "",
        "The perplexity of a pause model is that of its own read-out: the last step for "
        "`pause_ce`, the mixture over the model's stopping distribution for CYB losses. "
        "Mean pauses are the expected pauses per token under that read-out; a CYB run below "
        f"{objective_lib.COLLAPSE_PAUSES} is marked as collapsed.",
        "",
    ]
    sections += _ordering_notes(one_by_one)

    # Figure 6.
    curve_methods = []
    for run in runs:
        if run.regime != "1x1" and run.series not in curve_methods:
            curve_methods.append(run.series)
    curves = {
        series: [run for run in runs if run.series == series and run.regime != "pretrain"]
        for series in curve_methods
    }
    if curves:
        plots.data_efficiency(
            {
                _label_of(curves[method]): [
                    (run.data_multiple, run.passes, run.perplexity)
                    for run in curves[method]
                    if run.finished
                ]
                for method in curve_methods
            },
            "Validation perplexity by data regime",
            os.path.join(figure_dir, "figure6.png"),
        )
        regimes = ["1x1", "2x1", "1x2", "1x3"]
        rows = []
        for method in curve_methods:
            cells = {run.regime: run for run in curves[method]}
            rows.append(
                [
                    _label_of(curves[method]),
                    *(
                        _format(cells[regime].perplexity) if regime in cells else "–"
                        for regime in regimes
                    ),
                ]
            )
        sections += [
            "## Figure 6: data efficiency",
            "",
            "Regime PxD is P passes over D times the base fine-tuning budget.",
            "",
            f"![Figure 6]({figure_link}/figure6.png)",
            "",
            _table(["method", *regimes], rows),
            "",
        ]
        sections += _ratio_section(curves)

    # Latency and calibration of the best CYB model.
    if analysis is not None and analysis_dir is not None:
        for name in ("pause_histogram.png", "stopping_distribution.png", "calibration.png"):
            source = os.path.join(analysis_dir, name)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(figure_dir, f"best_{name}"))
        stop = analysis["mean_stop"]
        spearman = ", ".join(
            f"step {i}: {rho:.3f} (p {report.format_p_value(p)})"
            for i, (rho, p) in enumerate(zip(analysis["spearman"], analysis["spearman_p_values"]))
        )
        sections += [
            f"## Latency and calibration of the best CYB model: {analysis['run']}",
            "",
            f"Evaluated on {analysis['tokens']:,} tokens of {analysis['source']}. Mean expected "
            f"pauses per token {analysis['mean_pauses']:.3f} (the CYB paper's best AP model: 0.83). "
            "Stopping step averaged over tokens: "
            + ", ".join(
                f"{i} pause{'' if i == 1 else 's'} {100 * p:.1f}%" for i, p in enumerate(stop)
            )
            + " (CYB paper: 58 / 16 / 13 / 14%).",
            "",
            f"![pauses per token]({figure_link}/best_pause_histogram.png)",
            f"![stopping step]({figure_link}/best_stopping_distribution.png)",
            "",
            f"Spearman correlation of d_i with the gain t_(i+1) - t_i: {spearman} "
            "(CYB paper: 0.383, 0.157, 0.271).",
            "",
            f"![calibration]({figure_link}/best_calibration.png)",
            "",
        ]

    # Every run.
    rows = []
    for run in [pretrained, *runs]:
        rows.append(
            (
                run.name,
                run.regime,
                _format(run.value("parameters"), 0),
                _format(run.value("step"), 0),
                _format(run.value("tokens_seen"), 0),
                _minutes(run.seconds),
                _format(run.perplexity),
                _pauses_cell(run) if run.method != "ce" else "0",
                run.beyond_paper or "–",
            )
        )
    finished_seconds = sum(run.seconds or 0.0 for run in [pretrained, *runs])
    sections += [
        "## Every run",
        "",
        f"{sum(run.finished for run in [pretrained, *runs])} of {len(runs) + 1} runs finished; "
        f"{finished_seconds / 3600:.2f} hours of wall time in all. Tokens are real tokens "
        "read (steps x batch x sequence length); a pause model runs W slots for each. "
        "Minutes are the wall time of a run's processes (start-up, compilation, training and "
        "evaluation) summed over restarts; other jobs sharing the machine make them longer.",
        "",
        _table(
            [
                "run",
                "regime",
                "parameters",
                "steps",
                "tokens",
                "minutes",
                "perplexity",
                "mean pauses",
                "beyond the CYB paper",
            ],
            rows,
        ),
        "",
        "## Regenerate",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    text = "\n".join(sections)
    with open(output, "w", encoding="utf-8") as handle:
        handle.write(text)
    return text


def _label_of(runs: Sequence[RunRecord]) -> str:
    return runs[0].label


def _pause_steps_untrained(run: RunRecord) -> bool:
    window = int(run.value("window", 1))
    steps = [run.value(f"eval/perplexity_step_{i}") for i in range(window)]
    return window > 1 and min(steps[1:]) > UNTRAINED_STEP_RATIO * steps[0]


def _ordering_notes(one_by_one: Sequence[RunRecord]) -> list[str]:
    """State whether the CYB paper's main orderings hold here."""
    by_method = {run.method: run for run in one_by_one if not run.beyond_paper}
    notes = []

    def compare(better: str, worse: str, claim: str) -> None:
        if better in by_method and worse in by_method:
            holds = by_method[better].perplexity < by_method[worse].perplexity
            verdict = "holds here" if holds else "does not hold here"
            notes.append(
                f"- {claim}: {verdict} ({by_method[better].label} {by_method[better].perplexity:.2f}, "
                f"{by_method[worse].label} {by_method[worse].perplexity:.2f})."
            )

    compare("ap", "ce", "CYB-AP beats fine-tuning without pauses")
    compare("ap", "pause_ce_3", "CYB-AP beats pauses with cross-entropy (3 pauses)")
    compare("dp", "ce", "CYB-DP beats fine-tuning without pauses")
    cyb = [by_method[name] for name in ("ap", "va", "dp") if name in by_method]
    if len(cyb) == 3:
        worst = max(cyb, key=lambda run: run.perplexity)
        verdict = "holds here" if worst.method == "va" else f"does not hold here ({worst.label} is)"
        notes.append(f"- CYB-VA is the worst CYB loss: {verdict}.")
    untrained = [run for run in one_by_one if is_cyb(run.method) and _pause_steps_untrained(run)]
    if untrained:
        notes.append(
            "- Pause steps left untrained (every pause step's perplexity above "
            f"{UNTRAINED_STEP_RATIO:g}x that of step 0, so the model does better by not "
            "pausing): " + ", ".join(run.label for run in untrained) + "."
        )
    collapsed = [run.label for run in one_by_one if run.collapsed]
    if collapsed:
        notes.append(
            "- Collapsed to no pauses: " + ", ".join(collapsed) + ". Their reruns with the "
            "countermeasures of the README's section 'Pauses must be used' are the rows "
            "marked beyond the CYB paper."
        )
    if not notes:
        return []
    return ["The CYB paper's findings, checked on these runs:", "", *notes, ""]


def _ratio_section(curves: Mapping[str, Sequence[RunRecord]]) -> list[str]:
    """Tabulate the data-efficiency ratios of the baselines against every one-pass CYB-AP run."""
    references = [
        run
        for method, runs in curves.items()
        if method.startswith("ap")
        for run in runs
        if run.passes == 1 and run.finished
    ]
    rows = []
    for baseline in ("ce", "pause_ce_3"):
        if baseline not in curves:
            continue
        for reference in references:
            ratio = data_ratio(curves[baseline], reference)
            if ratio is None:
                continue
            value, how = ratio
            measured = max(run.data_multiple for run in curves[baseline]) / reference.data_multiple
            if math.isinf(value):
                cell = "never"
            elif how == "extrapolated" and value > EXTRAPOLATION_LIMIT * measured:
                # Too far beyond the measured points for the straight line to mean anything.
                cell = f"more than {measured:g}x"
                how = "beyond the measured range"
            else:
                cell = f"{value:.2f}x"
            paper = PAPER_DATA_RATIOS.get(baseline)
            rows.append(
                (
                    curves[baseline][0].label,
                    f"{reference.label} at {reference.regime} ({reference.perplexity:.2f})",
                    cell,
                    how,
                    f"{paper:.0f}x" if paper else "–",
                )
            )
    if not rows:
        return []
    return [
        "### Data-efficiency ratios",
        "",
        "How many times the data of the CYB-AP run the baseline needs for the same "
        "perplexity, from the baseline's one-pass points (1x1, 1x2, 1x3), interpolating log "
        "perplexity linearly in log data.",
        "",
        _table(["baseline", "matches", "data needed", "how", "CYB paper"], rows),
        "",
    ]
