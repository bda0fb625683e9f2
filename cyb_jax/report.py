"""The markdown report of one analysed run; `analyze.py` computes its numbers."""

from typing import Any


def format_p_value(p_value: float) -> str:
    # scipy returns 0 when the p-value underflows a float64.
    return "< 1e-300" if p_value == 0 else f"= {p_value:.2g}"


def run_report(
    numbers: dict[str, Any],
    token_markdown: str,
    has_calibration: bool,
    *,
    min_token_count: int,
    tokens_per_group: int,
) -> str:
    """Return the markdown report of one run from the numbers `analyze.write_analysis` computed."""
    stops = ", ".join(
        f"{100 * value:.1f}% at step {i}" for i, value in enumerate(numbers["mean_stop"])
    )
    ppl_rows = "\n".join(
        f"| {name} | {value:.3f} |" for name, value in numbers["perplexity"].items()
    )
    lines = [
        f"# Analysis of {numbers['run']}",
        "",
        f"Loss `{numbers['loss']}`, W = {numbers['window']}, evaluated on {numbers['source']} "
        f"({numbers['tokens']:,} tokens).",
        "",
        "## Perplexity",
        "",
        "| read-out | perplexity |",
        "| --- | --- |",
        ppl_rows,
        "",
        "![perplexity](perplexity.png)",
        "",
        "## Latency",
        "",
        f"Mean expected pauses per token: {numbers['mean_pauses']:.3f}. The model answers, "
        f"averaged over tokens, {stops}.",
        "",
        "![expected pauses](pause_histogram.png)",
        "",
        "![stopping step](stopping_distribution.png)",
        "",
        "## Calibration",
        "",
    ]
    if has_calibration:
        correlations = ", ".join(
            f"step {i}: ρ = {rho:.3f} (p {format_p_value(p)})"
            for i, (rho, p) in enumerate(zip(numbers["spearman"], numbers["spearman_p_values"]))
        )
        lines += [
            "Spearman correlation between d_i and the gain t_{i+1} - t_i: " + correlations + ".",
            "A positive ρ means the model asks to wait where waiting helps.",
            "",
            "![calibration](calibration.png)",
        ]
    else:
        lines.append("Not applicable: the model has no pause steps (W = 1).")
    lines += [
        "",
        "## Tokens",
        "",
        f"Tokens with at least {min_token_count} occurrences, split at the median over tokens of "
        "their median expected pauses and of its variance across contexts; the most frequent "
        f"{tokens_per_group} of each group.",
        "",
        token_markdown,
        "",
        "## Passages",
        "",
        "[passages.html](passages.html) shades each token of the first passages by its "
        "expected pauses.",
        "",
        "## Learning curves",
        "",
        "![learning curves](learning_curves.png)",
        "",
    ]
    return "\n".join(lines)
