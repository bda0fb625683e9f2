"""Tests of how a run stops: on SIGTERM, on a failed checkpoint save, on a NaN or Inf update."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import ce as ce_config
from cyb_jax import configuration
from cyb_jax import objective as objective_lib
from cyb_jax import preemption
from cyb_jax import train

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_SECONDS = 240


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tensorflow_datasets"))


def _tiny_flags(data_dir, workdir):
    return [
        "--config=configs/ce.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.seq_len=32",
        "--config.data.batch_size=4",
        "--config.data.eval_max_batches=1",
        "--config.model.num_layers=1",
        "--config.model.d_model=32",
        "--config.model.num_heads=2",
        "--config.model.mlp_dim=64",
        "--config.total_steps=100000",
        "--config.eval_every=100000",
        "--config.checkpoint_every=100000",
        "--config.log_every=1",
        "--config.optimizer.warmup_steps=2",
    ]


class _Run:
    """A training subprocess whose stdout lines are collected by a reader thread."""

    def __init__(self, arguments):
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cyb_jax.main", *arguments],
            cwd=REPOSITORY,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str) -> str:
        """Return the first output line containing `text`; fail on exit or timeout."""
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"Run exited before printing {text!r}:\n{''.join(self.lines)}")
            self.lines.append(line)
            if text in line:
                return line
        self.process.kill()
        pytest.fail(f"Timed out waiting for {text!r}:\n{''.join(self.lines)}")

    def terminate_and_wait(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=TIMEOUT_SECONDS)
        self.wait_for_end()
        return status

    def wait_for_end(self):
        while (line := self._queue.get(timeout=TIMEOUT_SECONDS)) is not None:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)


def _latest_step(workdir):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data")) as m:
        return m.latest_step()


def _stopped_step(output: str) -> int:
    marker = "Stopped by SIGTERM at step "
    assert marker in output, output
    return int(output.split(marker, 1)[1].split(".", 1)[0])


def test_sigterm_saves_exits_and_resumes(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    arguments = _tiny_flags(data_dir, workdir)

    first = _Run(arguments)
    first.wait_for("step 2/100000")
    status = first.terminate_and_wait()
    output = first.output()
    assert status == preemption.EXIT_CODE == 143, output
    assert "Rerun the same command to resume" in output
    assert f"--workdir={workdir}" in output
    stopped = _stopped_step(output)
    assert stopped >= 2
    # checkpoint_every is far away, so this checkpoint exists only because of SIGTERM.
    assert _latest_step(workdir) == stopped
    assert not os.path.exists(os.path.join(workdir, "summary.json"))

    second = _Run(arguments)
    second.wait_for(f"Resuming from the checkpoint at step {stopped} ")
    second.wait_for(f"step {stopped + 1}/100000")
    status = second.terminate_and_wait()
    assert status == preemption.EXIT_CODE, second.output()
    assert _latest_step(workdir) == _stopped_step(second.output()) > stopped


def _tiny_ce(data_dir, **overrides):
    config = ce_config.get_config()
    config.data.data_dir = data_dir
    config.data.seq_len = 32
    config.data.batch_size = 4
    config.data.eval_max_batches = 1
    config.model.num_layers = 1
    config.model.d_model = 32
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.total_steps = 2
    config.eval_every = 2
    config.checkpoint_every = 2
    config.log_every = 1
    config.optimizer.warmup_steps = 1
    for key, value in overrides.items():
        config[key] = value
    return config


def test_failed_background_save_stops_run(data_dir, tmp_path, monkeypatch):
    """A save that fails in Orbax's background commit stops the run with that error.

    Tests run as root, where a read-only checkpoint directory is still writable,
    so the failure is simulated: the background step that renames the temporary
    checkpoint directory to its final name raises.
    The run must raise the error when it waits for the final checkpoint, not
    write a summary as if the checkpoint existed.
    """
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    def fail_commit(*args, **kwargs):
        raise OSError("simulated write failure")

    monkeypatch.setattr(async_checkpointer, "_on_commit_callback", fail_commit)
    workdir = str(tmp_path / "broken")
    with pytest.raises(OSError, match="simulated write failure"):
        train.train_and_evaluate(_tiny_ce(data_dir), workdir)
    assert not os.path.exists(os.path.join(workdir, "summary.json"))


def _poison_loss_at_step(monkeypatch, bad_step):
    """Make the training loss NaN at optimizer step `bad_step` (0-based) only."""
    make_objective = objective_lib.make_objective

    def make_poisoned(config, model_config):
        objective = make_objective(config, model_config)

        def poisoned(logits, targets, weights, step, granted=None):
            loss, metrics = objective(logits, targets, weights, step, granted)
            factor = jnp.where(step == bad_step, jnp.nan, 1.0)
            return loss * factor, {**metrics, "loss": metrics["loss"] * factor}

        return poisoned

    monkeypatch.setattr(objective_lib, "make_objective", make_poisoned)


def test_nonfinite_loss_stops_run(data_dir, tmp_path, monkeypatch):
    _poison_loss_at_step(monkeypatch, bad_step=2)
    workdir = str(tmp_path / "nan")
    config = _tiny_ce(data_dir, total_steps=4)
    with pytest.raises(train.NonFiniteError) as error:
        train.train_and_evaluate(config, workdir)
    message = str(error.value)
    assert "train/loss is nan at step 3" in message
    assert "newest checkpoint is step 2" in message
    assert "--config.skip_nonfinite_updates=true" in message
    assert _latest_step(workdir) == 2


def test_nonfinite_update_skipped_when_enabled(data_dir, tmp_path, monkeypatch):
    _poison_loss_at_step(monkeypatch, bad_step=2)
    workdir = str(tmp_path / "skip")
    config = _tiny_ce(data_dir, total_steps=4, skip_nonfinite_updates=True)
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    skipped = {r["step"]: r["train/skipped_updates"] for r in records if "train/loss" in r}
    assert skipped == {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0}
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data")) as m:
        restored = m.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    for leaf in jax.tree.leaves(restored["state"]["params"]):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_resume_rejects_checkpoint_changes(data_dir, tmp_path, capsys):
    workdir = str(tmp_path / "changed")
    train.train_and_evaluate(_tiny_ce(data_dir), workdir)

    wider = _tiny_ce(data_dir, total_steps=3)
    wider.model.d_model = 64
    wider.pause.window = 2
    wider.loss.name = "ap"
    with pytest.raises(configuration.ConfigError) as error:
        train.train_and_evaluate(wider, workdir)
    message = str(error.value)
    assert "model.d_model: 32 -> 64" in message
    assert "pause.window: 1 -> 2" in message
    assert "loss.name: 'ce' -> 'ap'" in message
    assert "total_steps" not in message
    assert "--config.allow_config_change=true" in message

    capsys.readouterr()
    train.train_and_evaluate(_tiny_ce(data_dir, total_steps=3, log_every=2), workdir)
    output = capsys.readouterr().out
    assert "Config changed since the checkpoints were written: total_steps: 2 -> 3" in output
    assert "log_every: 1 -> 2" in output
    assert "Resuming from the checkpoint at step 2" in output
    assert _latest_step(workdir) == 3
