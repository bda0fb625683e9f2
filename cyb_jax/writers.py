"""Metric output: TensorBoard event files, metrics.jsonl and the console.

Only process 0 writes; other processes get a writer that discards everything,
so callers never branch on the process index.
"""

import json
import math
import os
import time
from typing import Mapping

import jax
import numpy as np
from absl import logging


def _scalar(value) -> float:
    return float(np.asarray(value))


class MetricWriter:
    """Writes scalars to `<workdir>/tensorboard` and appends them to `<workdir>/metrics.jsonl`."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._summary_writer = None
        self._jsonl = None
        if self.enabled:
            # TensorFlow is imported lazily so that JAX initialises its backend first.
            import tensorflow as tf

            self._tf = tf
            self._summary_writer = tf.summary.create_file_writer(
                os.path.join(workdir, "tensorboard")
            )
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {name: _scalar(value) for name, value in scalars.items()}
        with self._summary_writer.as_default(step=step):
            for name, value in values.items():
                self._tf.summary.scalar(name, value)
        record = {"step": int(step), "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def flush(self) -> None:
        if self.enabled:
            self._summary_writer.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._summary_writer.close()
            self._jsonl.close()


class Progress:
    """Console progress lines with step, loss, throughput and ETA.

    Throughput is averaged from the last `restart`, so an evaluation or the first
    step's compilation does not count as training time.
    """

    def __init__(self, total_steps: int, start_step: int, tokens_per_step: int):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.restart(start_step)

    def restart(self, step: int) -> None:
        """Start timing afresh at `step`."""
        self._start_step, self._start_time = step, time.perf_counter()

    def line(self, step: int, scalars: Mapping[str, float]) -> str:
        """Format the line for `step`; call it once that step has finished."""
        elapsed = time.perf_counter() - self._start_time
        parts = [f"step {step}/{self.total_steps}"]
        parts += [
            f"{name} {_scalar(scalars[name]):.4f}"
            for name in ("train/loss", "train/nll")
            if name in scalars
        ]
        if "pause/mean_pauses" in scalars:
            parts.append(f"pauses {_scalar(scalars['pause/mean_pauses']):.3f}")
        if step > self._start_step and elapsed > 0:
            steps_per_second = (step - self._start_step) / elapsed
            remaining = (self.total_steps - step) / steps_per_second
            parts.append(f"{steps_per_second * self.tokens_per_step:,.0f} tokens/s")
            parts.append(f"ETA {format_duration(remaining)}")
        return " | ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def summary_table(summary: Mapping[str, float], unigram_perplexity: float) -> str:
    """Format the final evaluation as a two-column table for the console."""
    rows = [("step", f"{summary['step']:d}"), ("tokens seen", f"{summary['tokens_seen']:,d}")]
    rows.append(("unigram perplexity (validation)", f"{unigram_perplexity:.2f}"))
    for name in sorted(summary):
        value = summary[name]
        if name.startswith("eval/") and isinstance(value, float) and math.isfinite(value):
            rows.append((name, f"{value:.4f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def log_and_print(message: str) -> None:
    """Print a line for the user on process 0 and log it at INFO level on every process."""
    logging.info(message)
    if jax.process_index() == 0:
        print(message, flush=True)
