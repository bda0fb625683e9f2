"""Figures and the shaded-text page of `analyze.py`, written with matplotlib's Agg backend.

Every function takes the numbers to draw, already computed, and a path to write,
so that tests can check the numbers apart from the drawing.
"""

import html
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 120


def _save(figure, path: str) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def pause_histogram(counts: np.ndarray, edges: np.ndarray, title: str, path: str) -> None:
    """Draw the share of tokens per bin of expected pauses."""
    figure, axes = plt.subplots(figsize=(6, 4))
    total = max(counts.sum(), 1)
    axes.bar(
        edges[:-1],
        100.0 * counts / total,
        width=np.diff(edges),
        align="edge",
        color="tab:blue",
        edgecolor="white",
    )
    axes.set_xlabel("expected pauses per token, E[S]")
    axes.set_ylabel("tokens (%)")
    axes.set_xlim(edges[0], edges[-1])
    axes.set_title(title)
    _save(figure, path)


def stopping_distribution(mean_stop_W: np.ndarray, title: str, path: str) -> None:
    """Draw the token-averaged probability of answering at each step."""
    figure, axes = plt.subplots(figsize=(6, 4))
    steps = np.arange(mean_stop_W.size)
    axes.bar(steps, 100.0 * mean_stop_W, color="tab:orange")
    for step, value in zip(steps, mean_stop_W):
        axes.annotate(f"{100 * value:.1f}%", (step, 100 * value), ha="center", va="bottom")
    axes.set_xticks(steps)
    axes.set_xlabel("stopping step S (pauses before the answer)")
    axes.set_ylabel("Pr(S = i), averaged over tokens (%)")
    axes.set_ylim(0, max(105.0, 110 * mean_stop_W.max()))
    axes.set_title(title)
    _save(figure, path)


def calibration(
    dont_know_NxI: np.ndarray,
    gain_NxI: np.ndarray,
    correlations: Sequence[float],
    title: str,
    path: str,
) -> None:
    """Draw, for each step i, the joint density of d_i and t_{i+1} - t_i."""
    steps = dont_know_NxI.shape[1]
    figure, axes_row = plt.subplots(1, steps, figsize=(4.2 * steps, 4), squeeze=False)
    for i, axes in enumerate(axes_row[0]):
        _, _, _, image = axes.hist2d(
            dont_know_NxI[:, i],
            gain_NxI[:, i],
            bins=(40, 40),
            range=((0.0, 1.0), (-1.0, 1.0)),
            norm=matplotlib.colors.LogNorm(),
            cmap="viridis",
        )
        figure.colorbar(image, ax=axes, label="tokens")
        axes.axhline(0.0, color="white", linewidth=0.8)
        axes.set_xlabel(f"don't-know probability d_{i}")
        axes.set_ylabel(f"gain t_{i + 1} - t_{i} (probability)")
        axes.set_title(f"step {i}: Spearman ρ = {correlations[i]:.3f}")
    figure.suptitle(title)
    _save(figure, path)


def perplexity_bars(labels: Sequence[str], values: Sequence[float], title: str, path: str) -> None:
    """Draw one bar per perplexity, with its value printed on top."""
    figure, axes = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.5))
    positions = np.arange(len(labels))
    axes.bar(positions, values, color="tab:green")
    for position, value in zip(positions, values):
        axes.annotate(f"{value:.2f}", (position, value), ha="center", va="bottom")
    axes.set_xticks(positions)
    axes.set_xticklabels(labels, rotation=20, ha="right")
    axes.set_ylabel("perplexity (per token, lower is better)")
    axes.set_ylim(0, 1.15 * max(values))
    axes.set_title(title)
    _save(figure, path)


def learning_curves(
    curves: Mapping[str, Mapping[str, tuple[list, list]]], title: str, path: str
) -> None:
    """Draw training NLL and validation perplexity against the step, one line per run.

    `curves[run][metric]` is (steps, values) for the metrics 'train/nll' and
    'eval/perplexity'.
    """
    figure, (train_axes, eval_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for run, metrics in curves.items():
        steps, values = metrics.get("train/nll", ([], []))
        train_axes.plot(steps, values, label=run)
        steps, values = metrics.get("eval/perplexity", ([], []))
        eval_axes.plot(steps, values, marker="o", label=run)
    train_axes.set_xlabel("optimizer step")
    train_axes.set_ylabel("training read-out NLL (nats per token)")
    train_axes.set_title("training")
    eval_axes.set_xlabel("optimizer step")
    eval_axes.set_ylabel("validation perplexity (per token)")
    eval_axes.set_title("validation")
    for axes in (train_axes, eval_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    _save(figure, path)


def passages_html(
    passages: Sequence[Sequence[tuple[str, float]]], max_pauses: int, title: str, path: str
) -> None:
    """Write an HTML page of text whose tokens are shaded by their expected pauses.

    `passages` holds, per passage, (token text, expected pauses) pairs. Full red
    is `max_pauses`; white is none.
    """
    scale = max(max_pauses, 1)
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:Georgia,serif;max-width:52em;margin:2em auto;}"
        ".passage{white-space:pre-wrap;line-height:1.7;border-top:1px solid #ccc;padding:1em 0;}"
        "span{border-radius:2px;}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Each token's background shows the expected number of pauses the model spent "
        f"before producing it: white is 0, full red is {scale}. Hover over a token for the value.</p>",
        "<p>Scale: "
        + " ".join(
            f'<span style="background:rgba(214,39,40,{level / scale:.2f})">&nbsp;{level}&nbsp;</span>'
            for level in range(scale + 1)
        )
        + "</p>",
    ]
    for passage in passages:
        spans = []
        for text, pauses in passage:
            alpha = min(max(pauses / scale, 0.0), 1.0)
            spans.append(
                f'<span style="background:rgba(214,39,40,{alpha:.2f})" '
                f'title="{pauses:.2f} pauses">{html.escape(text)}</span>'
            )
        parts.append('<div class="passage">' + "".join(spans) + "</div>")
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))


def data_efficiency(
    points: Mapping[str, Sequence[tuple[int, int, float]]], title: str, path: str
) -> None:
    """Draw perplexity against the data read, one line per method.

    `points[method]` contains (data multiple D, passes P, perplexity) per regime PxD.
    One-pass regimes are joined by a line; repeated passes are hollow markers at
    the data they read (P x D), labelled with their regime.
    """
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, (method, regimes) in enumerate(points.items()):
        color = f"C{index}"
        one_pass = sorted((data, value) for data, passes, value in regimes if passes == 1)
        if one_pass:
            axes.plot(*zip(*one_pass), marker="o", color=color, label=f"{method}, one pass")
        for data, passes, value in regimes:
            if passes > 1:
                axes.plot(
                    [passes * data],
                    [value],
                    marker="s",
                    markerfacecolor="none",
                    color=color,
                    linestyle="none",
                    label=f"{method}, {passes}x{data}",
                )
    axes.set_xlabel("data read, in multiples of the base budget")
    axes.set_ylabel("validation perplexity (per token, lower is better)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    axes.set_title(title)
    _save(figure, path)
