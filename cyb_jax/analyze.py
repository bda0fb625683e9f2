"""Analyse trained runs: latency, calibration, pausing tokens, shaded passages, comparison.

    python -m cyb_jax.analyze runs/ap [runs/pause_ce ...] [--text_file=FILE]

For each workdir, the newest checkpoint is evaluated on the validation split (or
on a text file, one document per line), and `WORKDIR/analysis/` receives:

  report.md                  the numbers below, with the figures embedded
  pause_histogram.png        share of tokens by expected pauses E[S]
  stopping_distribution.png  Pr(S = i) averaged over tokens
  calibration.png            density of d_i against t_{i+1} - t_i per step, Spearman ρ
  perplexity.png             read-out, per-step and self-paced perplexities
  learning_curves.png        training NLL and validation perplexity from metrics.jsonl
  tokens.md                  tokens with low or high median pauses and low or high variance
  passages.html              validation text shaded by expected pauses
  numbers.json               every number of the report

With several workdirs, a comparison folder (default: `comparison/` beside the
first workdir) receives a perplexity bar chart, the learning curves of all runs
and a report.md.

A token's pauses are those spent before producing it: the quantities of the
prediction whose target is the token. S is the stopping step under the model's
own read-out rule: the halting distribution s_i = (1 - d_i) Π_{j<i} d_j for CYB
losses, step 0 for 'ce' and the last step for 'pause_ce'.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from cyb_jax import losses
from cyb_jax import model as model_lib
from cyb_jax import objective as objective_lib
from cyb_jax import plots
from cyb_jax import report

# Bins per pause of the expected-pauses histogram.
BINS_PER_PAUSE = 10
# A token enters the token table only with at least this many occurrences.
MIN_TOKEN_COUNT = 20
# Tokens listed per group of the token table.
TOKENS_PER_GROUP = 8
FIGURES = (
    ("pause_histogram.png", "Expected pauses per token"),
    ("stopping_distribution.png", "Stopping step, averaged over tokens"),
    ("calibration.png", "Calibration of don't-know"),
    ("perplexity.png", "Perplexity by read-out"),
    ("learning_curves.png", "Learning curves"),
)


@dataclasses.dataclass
class TokenRecords:
    """Per-token quantities of the evaluated real tokens (padding removed), in data order."""

    targets: np.ndarray  # token ids [N]
    rows: np.ndarray  # index of the evaluated row that contains the token [N]
    segments: np.ndarray  # packed segment id within the row [N]
    target_probs: np.ndarray  # t_i [N, W]
    dont_know: np.ndarray  # d_i [N, W]
    stop: np.ndarray  # Pr(S = i) under the read-out rule [N, W]
    pauses: np.ndarray  # E[S] [N]
    nll: np.ndarray  # read-out negative log-likelihood [N]
    step_nll: np.ndarray  # -log t_i [N, W]
    self_paced_nll: np.ndarray | None  # CYB losses only: NLL of the threshold rule [N]
    self_paced_pauses: np.ndarray | None  # CYB losses only: pauses of the threshold rule [N]


def _per_token(params, batch, *, model_config, loss_name):
    logits = model_lib.Transformer(model_config).apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    log_probs = losses.step_log_probs(logits, batch["targets"], model_config.dk_id)
    stats = objective_lib.token_statistics(log_probs, loss_name)
    window = model_config.window
    if loss_name in ("ce", "pause_ce"):
        read_step = 0 if loss_name == "ce" else window - 1
        stop = jnp.broadcast_to(jax.nn.one_hot(read_step, window), log_probs.target.shape)
    else:
        stop = jnp.exp(losses.stopping_distribution(log_probs, None))
    result = {
        "target_probs": jnp.exp(log_probs.target),
        "dont_know": jnp.exp(log_probs.dont_know),
        "stop": stop,
        "pauses": stats["pauses"],
        "nll": stats["nll"],
        "step_nll": -log_probs.target,
    }
    if "self_paced_nll" in stats:
        result["self_paced_nll"] = stats["self_paced_nll"]
        result["self_paced_pauses"] = stats["self_paced_pauses"]
    return result


def collect_records(
    params: Any,
    model_config: model_lib.TransformerConfig,
    loss_name: str,
    batches: Iterable[dict[str, np.ndarray]],
) -> TokenRecords:
    """Evaluate every batch and keep the per-token quantities of tokens with weight > 0."""
    compute = jax.jit(functools.partial(_per_token, model_config=model_config, loss_name=loss_name))
    parts: dict[str, list[np.ndarray]] = {}
    rows_seen = 0
    for batch in batches:
        arrays = {
            key: jnp.asarray(batch[key])
            for key in ("inputs", "targets", "positions", "segment_ids")
        }
        values = jax.device_get(compute(params, arrays))
        keep = np.asarray(batch["weights"]) > 0
        row_index = rows_seen + np.broadcast_to(np.arange(keep.shape[0])[:, None], keep.shape)
        values["targets"] = np.asarray(batch["targets"])
        values["rows"] = row_index
        values["segments"] = np.asarray(batch["segment_ids"])
        for key, value in values.items():
            parts.setdefault(key, []).append(np.asarray(value)[keep])
        rows_seen += keep.shape[0]
    if not parts:
        raise ValueError("No batches to evaluate.")
    merged = {key: np.concatenate(value) for key, value in parts.items()}
    if not merged["targets"].size:
        raise ValueError("The evaluated batches contain no token with positive weight.")
    merged.setdefault("self_paced_nll", None)
    merged.setdefault("self_paced_pauses", None)
    return TokenRecords(**merged)


# ----------------------------------------------------------------- statistics


def latency(records: TokenRecords) -> dict[str, Any]:
    """Histogram of E[S] over tokens, and Pr(S = i) averaged over tokens."""
    window = records.stop.shape[1]
    max_pauses = max(window - 1, 1)
    edges = np.linspace(0.0, max_pauses, BINS_PER_PAUSE * max_pauses + 1)
    counts, _ = np.histogram(np.clip(records.pauses, 0.0, max_pauses), bins=edges)
    return {
        "histogram_counts": counts,
        "histogram_edges": edges,
        "mean_stop": records.stop.mean(axis=0),
        "mean_pauses": float(records.pauses.mean()),
    }


def calibration(records: TokenRecords) -> dict[str, Any]:
    """d_i and the gain t_{i+1} - t_i for each step i < W - 1, with their Spearman ρ."""
    dont_know = records.dont_know[:, :-1]
    gain = records.target_probs[:, 1:] - records.target_probs[:, :-1]
    correlations, p_values = [], []
    for i in range(dont_know.shape[1]):
        result = scipy.stats.spearmanr(dont_know[:, i], gain[:, i])
        correlations.append(float(result.statistic))
        p_values.append(float(result.pvalue))
    return {"dont_know": dont_know, "gain": gain, "spearman": correlations, "p_values": p_values}


def token_table(
    records: TokenRecords, min_count: int = MIN_TOKEN_COUNT, per_group: int = TOKENS_PER_GROUP
) -> list[dict[str, Any]]:
    """Group frequent tokens by median pauses and their variance across contexts.

    Tokens with at least `min_count` occurrences are split at the median over tokens
    of their median E[S] ('low' below it, 'high' otherwise) and likewise of their
    variance. Each of the four groups lists its `per_group` most frequent tokens.
    """
    order = np.argsort(records.targets, kind="stable")
    tokens, starts, counts = np.unique(
        records.targets[order], return_index=True, return_counts=True
    )
    entries = []
    for token, start, count in zip(tokens, starts, counts):
        if count < min_count:
            continue
        pauses = records.pauses[order[start : start + count]]
        entries.append(
            {
                "token": int(token),
                "count": int(count),
                "median": float(np.median(pauses)),
                "variance": float(np.var(pauses)),
            }
        )
    if not entries:
        return []
    median_cut = np.median([entry["median"] for entry in entries])
    variance_cut = np.median([entry["variance"] for entry in entries])
    table = []
    for median_level in ("low", "high"):
        for variance_level in ("low", "high"):
            members = [
                entry
                for entry in entries
                if (entry["median"] < median_cut) == (median_level == "low")
                and (entry["variance"] < variance_cut) == (variance_level == "low")
            ]
            members.sort(key=lambda entry: (-entry["count"], entry["token"]))
            for entry in members[:per_group]:
                table.append(
                    {"median_level": median_level, "variance_level": variance_level, **entry}
                )
    return table


def perplexities(records: TokenRecords) -> dict[str, float]:
    """Read-out, per-step and self-paced perplexities, exp of the mean NLL over tokens."""
    result = {"read-out (mixture)": float(np.exp(records.nll.mean()))}
    for i in range(records.step_nll.shape[1]):
        result[f"step {i}"] = float(np.exp(records.step_nll[:, i].mean()))
    if records.self_paced_nll is not None:
        result["self-paced (d <= 0.5)"] = float(np.exp(records.self_paced_nll.mean()))
    return result


def read_metrics(workdir: str) -> dict[str, tuple[list, list]]:
    """Read (steps, values) of 'train/nll' and 'eval/perplexity' from a run's metrics.jsonl."""
    curves: dict[str, tuple[list, list]] = {"train/nll": ([], []), "eval/perplexity": ([], [])}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return curves
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            for name, (steps, values) in curves.items():
                if name in row:
                    steps.append(row["step"])
                    values.append(row[name])
    return curves


# -------------------------------------------------------------------- outputs


def _passages(records: TokenRecords, piece_of: Callable[[int], str], count: int):
    """Return the first `count` packed segments as (text, expected pauses) pairs."""
    passages = []
    keys = records.rows.astype(np.int64) * (1 << 20) + records.segments
    _, first = np.unique(keys, return_index=True)
    for start in sorted(first)[:count]:
        same = keys == keys[start]
        passages.append(
            [
                (piece_of(int(token)), float(pauses))
                for token, pauses in zip(records.targets[same], records.pauses[same])
            ]
        )
    return passages


def _token_markdown(table: list[dict[str, Any]], piece_of: Callable[[int], str]) -> str:
    lines = [
        "| median pauses | variance | token | id | count | median E[S] | variance of E[S] |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in table:
        text = piece_of(entry["token"]).replace("|", "\\|").replace("\n", "\\n")
        lines.append(
            f"| {entry['median_level']} | {entry['variance_level']} | `{text}` | {entry['token']} | "
            f"{entry['count']} | {entry['median']:.3f} | {entry['variance']:.4f} |"
        )
    return "\n".join(lines)


def write_analysis(
    records: TokenRecords,
    out_dir: str,
    *,
    run_name: str,
    loss_name: str,
    piece_of: Callable[[int], str],
    curves: dict[str, tuple[list, list]],
    source: str,
    passage_count: int = 4,
) -> dict[str, Any]:
    """Write the figures, token table, passages and report.md of one run; return the numbers."""
    os.makedirs(out_dir, exist_ok=True)
    window = records.stop.shape[1]
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731

    timing = latency(records)
    plots.pause_histogram(
        timing["histogram_counts"],
        timing["histogram_edges"],
        f"{run_name}: expected pauses per token (mean {timing['mean_pauses']:.3f})",
        path("pause_histogram.png"),
    )
    plots.stopping_distribution(
        timing["mean_stop"],
        f"{run_name}: stopping step averaged over tokens",
        path("stopping_distribution.png"),
    )
    calibrated = None
    if window > 1:
        calibrated = calibration(records)
        plots.calibration(
            calibrated["dont_know"],
            calibrated["gain"],
            calibrated["spearman"],
            f"{run_name}: don't-know against the gain of waiting one step",
            path("calibration.png"),
        )
    ppl = perplexities(records)
    plots.perplexity_bars(
        list(ppl),
        list(ppl.values()),
        f"{run_name}: validation perplexity by read-out",
        path("perplexity.png"),
    )
    plots.learning_curves(
        {run_name: curves}, f"{run_name}: learning curves", path("learning_curves.png")
    )
    table = token_table(records)
    token_markdown = _token_markdown(table, piece_of)
    with open(path("tokens.md"), "w", encoding="utf-8") as handle:
        handle.write(f"# Tokens by pauses: {run_name}\n\n{token_markdown}\n")
    plots.passages_html(
        _passages(records, piece_of, passage_count),
        window - 1,
        f"{run_name}: expected pauses per token",
        path("passages.html"),
    )

    numbers = {
        "run": run_name,
        "loss": loss_name,
        "window": window,
        "source": source,
        "tokens": int(records.targets.size),
        "perplexity": ppl,
        "mean_pauses": timing["mean_pauses"],
        "mean_stop": timing["mean_stop"].tolist(),
        "spearman": calibrated["spearman"] if calibrated else [],
        "spearman_p_values": calibrated["p_values"] if calibrated else [],
        "token_table": table,
    }
    with open(path("numbers.json"), "w", encoding="utf-8") as handle:
        json.dump(numbers, handle, indent=2)
    with open(path("report.md"), "w", encoding="utf-8") as handle:
        handle.write(
            report.run_report(
                numbers,
                token_markdown,
                calibrated is not None,
                min_token_count=MIN_TOKEN_COUNT,
                tokens_per_group=TOKENS_PER_GROUP,
            )
        )
    return numbers


def write_comparison(
    numbers_by_run: dict[str, dict[str, Any]],
    curves_by_run: dict[str, dict[str, tuple[list, list]]],
    out_dir: str,
) -> None:
    """Write the perplexity bar chart, the joint learning curves and report.md of several runs."""
    os.makedirs(out_dir, exist_ok=True)
    names = list(numbers_by_run)
    values = [numbers_by_run[name]["perplexity"]["read-out (mixture)"] for name in names]
    plots.perplexity_bars(
        names,
        values,
        "Validation perplexity under each model's read-out rule",
        os.path.join(out_dir, "perplexity.png"),
    )
    plots.learning_curves(
        curves_by_run, "Learning curves", os.path.join(out_dir, "learning_curves.png")
    )
    rows = "\n".join(
        f"| {name} | {numbers['loss']} | {numbers['window']} | "
        f"{numbers['perplexity']['read-out (mixture)']:.3f} | {numbers['mean_pauses']:.3f} | "
        f"[report](../{os.path.basename(name)}/analysis/report.md) |"
        for name, numbers in numbers_by_run.items()
    )
    comparison_text = "\n".join(
        [
            "# Comparison",
            "",
            "| run | loss | W | read-out perplexity | mean pauses | details |",
            "| --- | --- | --- | --- | --- | --- |",
            rows,
            "",
            "![perplexity](perplexity.png)",
            "",
            "![learning curves](learning_curves.png)",
            "",
        ]
    )
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(comparison_text)


# ------------------------------------------------------------------------- CLI


def analyze_workdir(
    workdir: str, *, text_file: str | None, max_batches: int | None, passage_count: int
) -> tuple[dict[str, Any], dict[str, tuple[list, list]]]:
    """Evaluate the newest checkpoint of `workdir` and write `workdir/analysis/`."""
    from cyb_jax import data
    from cyb_jax import decode

    run = decode.load_run(workdir)
    data_config = run.config.data
    source = "the validation split"
    if text_file:
        data.text_files_task("analyze_text_file", {"validation": text_file}, run.vocabulary)
        data_config.task = "analyze_text_file"
        source = text_file
    if max_batches is not None:
        data_config.eval_max_batches = max_batches
    batches = data.eval_batches(data_config, "validation")
    records = collect_records(run.params, run.model_config, run.config.loss.name, batches)
    pieces = decode.token_pieces(run.vocabulary, range(run.model_config.vocab_size))
    curves = read_metrics(workdir)
    numbers = write_analysis(
        records,
        os.path.join(workdir, "analysis"),
        run_name=os.path.basename(os.path.normpath(workdir)),
        loss_name=run.config.loss.name,
        piece_of=lambda token: pieces[token],
        curves=curves,
        source=f"{source}, checkpoint step {run.step}",
        passage_count=passage_count,
    )
    return numbers, curves


def main(argv: Sequence[str]) -> None:
    from absl import app
    from absl import flags
    from absl import logging

    values = flags.FLAGS
    workdirs = list(argv[1:])
    if not workdirs:
        raise app.UsageError("Give at least one workdir: python -m cyb_jax.analyze runs/ap")
    from cyb_jax import data

    data.hide_accelerators_from_tensorflow()
    # Checked before the first run is analysed, which takes a while.
    for workdir in workdirs:
        if not os.path.isfile(os.path.join(workdir, "config.json")):
            raise app.UsageError(
                f"{workdir} is not a training workdir: it has no config.json. Give the "
                "directories training runs wrote, such as runs/ap."
            )
    if not values["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    numbers_by_run, curves_by_run = {}, {}
    for workdir in workdirs:
        name = os.path.basename(os.path.normpath(workdir))
        numbers, curves = analyze_workdir(
            workdir,
            text_file=values.text_file,
            max_batches=values.max_batches,
            passage_count=values.passages,
        )
        numbers_by_run[name] = numbers
        curves_by_run[name] = curves
        print(
            f"{name}: read-out perplexity {numbers['perplexity']['read-out (mixture)']:.3f}, "
            f"mean pauses {numbers['mean_pauses']:.3f} -> "
            f"{os.path.join(workdir, 'analysis', 'report.md')}"
        )
    if len(workdirs) > 1:
        out_dir = values.comparison_dir or os.path.join(
            os.path.dirname(os.path.abspath(os.path.normpath(workdirs[0]))), "comparison"
        )
        write_comparison(numbers_by_run, curves_by_run, out_dir)
        print(f"comparison -> {os.path.join(out_dir, 'report.md')}")


def run_cli() -> None:
    from absl import app
    from absl import flags

    flags.DEFINE_string(
        "text_file",
        None,
        "Evaluate on this text file (one document per line) instead of the validation split.",
    )
    flags.DEFINE_integer(
        "max_batches", None, "Evaluate at most this many batches; default: the whole split."
    )
    flags.DEFINE_integer("passages", 4, "Passages shaded in passages.html.")
    flags.DEFINE_string(
        "comparison_dir",
        None,
        "Folder for the comparison of several runs; default: comparison/ beside the first workdir.",
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)


if __name__ == "__main__":
    run_cli()
