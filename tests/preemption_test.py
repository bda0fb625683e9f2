"""Tests of how a run stops and resumes: SIGTERM, SIGKILL, failed saves, NaN or Inf updates."""

import glob
import hashlib
import json
import os
import queue
import re
import shutil
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

from configs import ap as ap_config
from configs import ce as ce_config
from configs import dp as dp_config
from configs import pause_ce as pause_ce_config
from configs import va as va_config
from cyb_jax import checkpointing
from cyb_jax import configuration
from cyb_jax import data
from cyb_jax import objective as objective_lib
from cyb_jax import preemption
from cyb_jax import train
from tests import tiny

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

    def __init__(self, arguments, command=("-m", "cyb_jax.main"), environment=None):
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})}
        self.process = subprocess.Popen(
            [sys.executable, *command, *arguments],
            cwd=REPOSITORY,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Its own process group, so that kill_group also reaches the processes it forks.
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def kill_group(self) -> None:
        """SIGKILL the process and whatever it forked that still runs."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

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
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_names=("state", "data")
    ) as m:
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
    defaults = {
        "data.eval_max_batches": 1,
        "total_steps": 2,
        "eval_every": 2,
        "checkpoint_every": 2,
        "optimizer.warmup_steps": 1,
    }
    return tiny.configure(ce_config.get_config(), data_dir, **{**defaults, **overrides})


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
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_names=("state", "data")
    ) as m:
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


# --- SIGKILL and exact resume ----------------------------------------------------------

KILL_TOTAL_STEPS = 6
KILL_CHECKPOINT_EVERY = 2
# A killable run blocks when it requests this batch, after finishing steps 1..KILL_HOLD_INDEX,
# so the kill lands at the same point on every machine.
KILL_HOLD_INDEX = 5
# This loss's commit of KILL_PAUSED_STEP is held before Orbax renames the temporary
# directory to its final name, so the kill lands while that asynchronous save is in flight.
KILL_PAUSED_LOSS = "ap"
KILL_PAUSED_STEP = 4
KILL_LOSSES = {
    "ce": (ce_config, 1),
    "pause_ce": (pause_ce_config, 2),
    "ap": (ap_config, 2),
    "va": (va_config, 2),
    "dp": (dp_config, 2),
}


def kill_config(loss, data_dir):
    """The tiny config of the SIGKILL test: 2 layers, d_model 32, seq_len 16, batch 4."""
    module, window = KILL_LOSSES[loss]
    config = module.get_config()
    config.data.data_dir = data_dir
    config.data.seq_len = 16
    config.data.batch_size = 4
    config.data.eval_max_batches = 1
    config.model.num_layers = 2
    config.model.d_model = 32
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.pause.window = window
    if config.loss.prior:
        config.loss.prior = ":".join(["1"] * window)
    config.total_steps = KILL_TOTAL_STEPS
    config.eval_every = KILL_TOTAL_STEPS
    config.checkpoint_every = KILL_CHECKPOINT_EVERY
    config.log_every = 1
    config.optimizer.warmup_steps = 1
    return config


def batch_digest(batch) -> str:
    digest = hashlib.sha256()
    for key in train.BATCH_KEYS:
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()


def record_batches(record_dir, name, hold_index=None):
    """Wrap data.train_batches so that each batch appends 'index digest' to <name>.batches.

    With `hold_index`, the run that requests that batch writes <name>.held and blocks.
    """
    original = data.train_batches

    def recording(data_config, *, start_index=0, **kwargs):
        batches = original(data_config, start_index=start_index, **kwargs)
        for index in range(start_index, sys.maxsize):
            if index == hold_index:
                open(os.path.join(record_dir, f"{name}.held"), "w").close()
                threading.Event().wait()
            batch = next(batches)
            with open(os.path.join(record_dir, f"{name}.batches"), "a", encoding="utf-8") as handle:
                handle.write(f"{index} {batch_digest(batch)}\n")
            yield batch

    return recording


def read_batches(record_dir, name) -> dict[int, str]:
    with open(os.path.join(record_dir, f"{name}.batches"), encoding="utf-8") as handle:
        return {int(index): digest for index, digest in (line.split() for line in handle)}


def prepare_data(data_dir):
    """Build the dataset and fill this process's data caches, so forked runs share them."""
    config = kill_config("ce", data_dir)
    next(data.train_batches(config.data))
    next(iter(data.eval_batches(config.data, "validation")))
    data.unigram_perplexity(config.data, "validation")


def hold_commit(final_path):
    """Make Orbax's background commit of `final_path` print a line and block before its rename."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    commit = async_checkpointer._on_commit_callback

    def held(tmpdir, *args, **kwargs):
        if os.fspath(tmpdir.get_final()) == final_path:
            print(f"commit held for {final_path}", flush=True)
            threading.Event().wait()
        return commit(tmpdir, *args, **kwargs)

    async_checkpointer._on_commit_callback = held


def run_for_kill(loss, root, data_dir):
    """Train `loss` straight to the end, then start the run that the test kills."""
    config = kill_config(loss, data_dir)
    original = data.train_batches
    data.train_batches = record_batches(root, f"straight-{loss}")
    train.train_and_evaluate(config, os.path.join(root, "straight", loss))
    data.train_batches = original
    killed = os.path.join(root, "killed", loss)
    if loss == KILL_PAUSED_LOSS:
        hold_commit(os.path.join(killed, "checkpoints", str(KILL_PAUSED_STEP)))
    data.train_batches = record_batches(root, f"killed-{loss}", hold_index=KILL_HOLD_INDEX)
    train.train_and_evaluate(config, killed)


def rerun(loss, root, data_dir):
    """Rerun the killed run of `loss`, as rerunning its command would."""
    data.train_batches = record_batches(root, f"resumed-{loss}")
    train.train_and_evaluate(kill_config(loss, data_dir), os.path.join(root, "killed", loss))


# The process the test kills. It prepares the data once, then forks one child per loss,
# which inherits the imports and data caches. Each child trains its loss straight through,
# then starts the run that is killed. After the test has SIGKILLed every child, it forks
# one child per loss again for the rerun. Each Orbax save runs in its own process, because
# Orbax 0.12.8 deadlocks when CheckpointManagers in threads of one process save at once.
KILLED_PROCESS = """
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import preemption_test as helpers

root, data_dir = sys.argv[1], sys.argv[2]
helpers.prepare_data(data_dir)

def fork_all(function):
    children = {}
    for loss in helpers.KILL_LOSSES:
        pid = os.fork()
        if pid == 0:
            try:
                function(loss, root, data_dir)
                os._exit(0)
            except BaseException:
                import traceback
                traceback.print_exc()
                os._exit(1)
        children[pid] = loss
        print(f"child {loss} pid {pid}", flush=True)
    ended = {}
    while len(ended) < len(children):
        pid, status = os.waitpid(-1, 0)
        ended[children[pid]] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print("ended", sorted(ended.items()), flush=True)
    return ended

fork_all(helpers.run_for_kill)
print("rerunning", flush=True)
statuses = fork_all(helpers.rerun)
sys.exit(1 if any(statuses.values()) else 0)
"""


def _steps(workdir):
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_names=("state", "data")
    ) as m:
        return list(m.all_steps())


def test_sigkill_resume_is_exact(data_dir, tmp_path, request):
    """A SIGKILLed run, rerun, ends bitwise equal to an uninterrupted one, for every loss.

    Each loss's killable run is SIGKILLed while it waits for the batch after
    step 5, with checkpoint 4 committed. The ap run also has its asynchronous
    save of step 4 held before Orbax's final rename, which leaves only a
    temporary directory, so its rerun must resume from step 2.
    """
    root = str(tmp_path)
    # The killed runs and the reruns load the straight runs' compiled steps from JAX's
    # persistent cache instead of compiling them again.
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    process = _Run([root, data_dir], command=("-c", KILLED_PROCESS), environment=cache)
    # A failing assertion must not leave the forked training processes behind.
    request.addfinalizer(process.kill_group)

    def killable_runs_held():
        held = all(
            os.path.exists(os.path.join(root, f"killed-{loss}.held")) for loss in KILL_LOSSES
        )
        committed = all(
            os.path.isdir(os.path.join(root, "killed", loss, "checkpoints", "4"))
            for loss in KILL_LOSSES
            if loss != KILL_PAUSED_LOSS
        )
        return held and committed

    children = {}
    while len(children) < len(KILL_LOSSES):
        # Forked children share the output pipe, so a line may hold other text too.
        line = process.wait_for("child ")
        for match in re.finditer(r"child (\w+) pid (\d+)", line):
            children[match[1]] = int(match[2])
    process.wait_for("commit held for")
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while not killable_runs_held():
        if time.monotonic() > deadline or process.process.poll() is not None:
            process.process.kill()
            process.wait_for_end()
            pytest.fail(f"The killable runs never reached their hold:\n{process.output()}")
        time.sleep(0.2)

    paused = os.path.join(root, "killed", KILL_PAUSED_LOSS)
    for loss, pid in children.items():
        os.kill(pid, signal.SIGKILL)
    ended = process.wait_for("ended")
    for loss in KILL_LOSSES:
        assert f"('{loss}', -9)" in ended, ended

    debris = glob.glob(
        os.path.join(paused, "checkpoints", f"{KILL_PAUSED_STEP}.orbax-checkpoint-tmp*")
    )
    assert len(debris) == 1, os.listdir(os.path.join(paused, "checkpoints"))
    assert _steps(paused) == [2]
    for loss in KILL_LOSSES:
        if loss != KILL_PAUSED_LOSS:
            assert _steps(os.path.join(root, "killed", loss)) == [2, 4]

    assert process.process.wait(timeout=TIMEOUT_SECONDS) == 0, process.output()
    process.wait_for_end()
    assert glob.glob(os.path.join(paused, "checkpoints", "*.orbax-checkpoint-tmp*")) == []
    assert _steps(paused) == [2, 4, 6]
    for loss in KILL_LOSSES:
        straight_batches = read_batches(root, f"straight-{loss}")
        assert sorted(straight_batches) == list(range(KILL_TOTAL_STEPS))
        killed_batches = read_batches(root, f"killed-{loss}")
        assert sorted(killed_batches) == list(range(KILL_HOLD_INDEX))
        for index, digest in killed_batches.items():
            assert digest == straight_batches[index], (loss, index)
        # The rerun starts at the batch index that the restored checkpoint recorded.
        resumed_batches = read_batches(root, f"resumed-{loss}")
        restart = 2 if loss == KILL_PAUSED_LOSS else 4
        assert sorted(resumed_batches) == list(range(restart, KILL_TOTAL_STEPS)), loss
        for index, digest in resumed_batches.items():
            assert digest == straight_batches[index], (loss, index)

        step_straight, params_straight = tiny.final_params(os.path.join(root, "straight", loss))
        step_resumed, params_resumed = tiny.final_params(os.path.join(root, "killed", loss))
        assert step_straight == step_resumed == KILL_TOTAL_STEPS
        straight_leaves = jax.tree_util.tree_leaves_with_path(params_straight)
        resumed_leaves = jax.tree_util.tree_leaves_with_path(params_resumed)
        assert [path for path, _ in straight_leaves] == [path for path, _ in resumed_leaves]
        for (path, a), (_, b) in zip(straight_leaves, resumed_leaves):
            np.testing.assert_array_equal(
                np.asarray(a), np.asarray(b), err_msg=f"{loss} {jax.tree_util.keystr(path)}"
            )
    resumed_output = process.output().split("rerunning", 1)[1]
    assert "Resuming from the checkpoint at step 2 " in resumed_output
    assert resumed_output.count("Resuming from the checkpoint at step 4 ") == len(KILL_LOSSES) - 1


def test_failed_periodic_save_stops_run(data_dir, tmp_path, monkeypatch):
    """A periodic save whose background commit fails stops the run within a few steps.

    The commit of step 10 fails, simulated as in test_failed_background_save_stops_run.
    Batch 11 is held until that failure happened, so the run must notice it while
    training on, long before the next save at step 20.
    """
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    commit = async_checkpointer._on_commit_callback
    failed = threading.Event()

    def fail_step_10(tmpdir, *args, **kwargs):
        if os.path.basename(os.fspath(tmpdir.get_final())) == "10":
            failed.set()
            raise OSError("simulated write failure")
        return commit(tmpdir, *args, **kwargs)

    original_batches = data.train_batches

    def batches_waiting_for_failure(data_config, *, start_index=0, **kwargs):
        for index, batch in enumerate(
            original_batches(data_config, start_index=start_index, **kwargs)
        ):
            if index == 11:
                assert failed.wait(timeout=TIMEOUT_SECONDS)
                time.sleep(1.0)  # lets Orbax's finalize thread end after the failed commit
            yield batch

    monkeypatch.setattr(async_checkpointer, "_on_commit_callback", fail_step_10)
    monkeypatch.setattr(data, "train_batches", batches_waiting_for_failure)
    workdir = str(tmp_path / "periodic")
    config = _tiny_ce(data_dir, total_steps=20, checkpoint_every=10, eval_every=20)
    with pytest.raises((OSError, checkpointing.CheckpointError)) as error:
        train.train_and_evaluate(config, workdir)
    message = str(error.value)
    assert (
        "simulated write failure" in message or "checkpoint at step 10 was not committed" in message
    )
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        trained = [json.loads(line)["step"] for line in handle if "train/loss" in line]
    assert max(trained) <= 14, trained
    assert not os.path.exists(os.path.join(workdir, "summary.json"))


def test_leftover_temporary_checkpoint_is_ignored(data_dir, tmp_path):
    """A temporary directory left by a save killed before its commit is neither restored nor kept."""
    workdir = str(tmp_path / "debris")
    train.train_and_evaluate(_tiny_ce(data_dir), workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    debris = os.path.join(checkpoints, "3.orbax-checkpoint-tmp-1234567890")
    shutil.copytree(os.path.join(checkpoints, "2"), debris)
    os.remove(os.path.join(debris, "commit_success.txt"))
    assert _latest_step(workdir) == 2

    summary = train.train_and_evaluate(_tiny_ce(data_dir, total_steps=3), workdir)
    assert summary["step"] == 3
    assert _steps(workdir) == [2, 3]
    assert not os.path.exists(debris)


def _damage(step_dir, how):
    state_dir = os.path.join(step_dir, "state")
    if how == "missing":
        os.remove(os.path.join(state_dir, "_METADATA"))
    else:
        for path in glob.glob(os.path.join(state_dir, "ocdbt.process_0", "d", "*")):
            os.truncate(path, 10)


def _listing(directory):
    return sorted(
        os.path.relpath(os.path.join(folder, name), directory)
        for folder, _, names in os.walk(directory)
        for name in names
    )


def test_damaged_checkpoint_is_named_and_fallback_restores(data_dir, tmp_path, capsys):
    workdir = str(tmp_path / "damaged")
    train.train_and_evaluate(_tiny_ce(data_dir, total_steps=6, checkpoint_every=2), workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    _damage(os.path.join(checkpoints, "6"), "missing")
    _damage(os.path.join(checkpoints, "4"), "truncated")
    files_6 = _listing(os.path.join(checkpoints, "6"))
    files_4 = _listing(os.path.join(checkpoints, "4"))

    longer = _tiny_ce(data_dir, total_steps=8, checkpoint_every=2)
    with pytest.raises(checkpointing.CheckpointError) as error:
        train.train_and_evaluate(longer, workdir)
    message = str(error.value)
    assert f"The newest checkpoint {checkpoints}/6 is damaged" in message
    assert "_METADATA" in message
    assert "--config.restore_fallback=true" in message
    assert "Nothing was deleted" in message
    assert _listing(os.path.join(checkpoints, "6")) == files_6

    capsys.readouterr()
    fallback = _tiny_ce(data_dir, total_steps=8, checkpoint_every=2, restore_fallback=True)
    summary = train.train_and_evaluate(fallback, workdir)
    output = capsys.readouterr().out
    assert f"moved to {checkpoints}_damaged/6" in output
    assert f"moved to {checkpoints}_damaged/4" in output
    assert "Resuming from the checkpoint at step 2 " in output
    assert summary["step"] == 8
    assert _listing(f"{checkpoints}_damaged/6") == files_6
    assert _listing(f"{checkpoints}_damaged/4") == files_4
    assert _steps(workdir) == [4, 6, 8]


def test_shape_mismatch_lists_parameters(data_dir, tmp_path):
    workdir = str(tmp_path / "shapes")
    train.train_and_evaluate(_tiny_ce(data_dir), workdir)
    os.remove(os.path.join(workdir, "config.json"))  # nothing left to compare the config with
    wider = _tiny_ce(data_dir, total_steps=3)
    wider.model.mlp_dim = 128
    with pytest.raises(checkpointing.ShapeMismatchError) as error:
        train.train_and_evaluate(wider, workdir)
    message = str(error.value)
    assert f"{workdir}/checkpoints/2 does not fit this run's model" in message
    assert "params/layer_0/mlp/up/kernel: checkpoint (32, 64), run (32, 128)" in message
    assert "params/layer_0/mlp/down/kernel: checkpoint (64, 32), run (128, 32)" in message
    assert "params/embedding" not in message
    assert "Traceback" not in message


def test_optimizer_change_rejected_or_reset(data_dir, tmp_path, capsys):
    workdir = str(tmp_path / "optimizer")
    train.train_and_evaluate(_tiny_ce(data_dir), workdir)
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_names=("state", "data")
    ) as m:
        saved = m.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    changed = _tiny_ce(data_dir, total_steps=3)
    changed.optimizer.b2 = 0.95
    with pytest.raises(checkpointing.OptimizerChangeError) as error:
        train.train_and_evaluate(changed, workdir)
    message = str(error.value)
    assert "optimizer.b2: 0.98 -> 0.95" in message
    assert "--config.reset_optimizer=true" in message
    assert _steps(workdir) == [2]

    # The reset run takes no optimizer step: it checks what the restore produced.
    reset = _tiny_ce(data_dir, total_steps=2, reset_optimizer=True)
    reset.optimizer.b2 = 0.95
    restored = {}
    restore = checkpointing.restore_checked

    def keep_restored(*args, **kwargs):
        state, batch_index, was_reset = restore(*args, **kwargs)
        restored.update(state=state, batch_index=batch_index, reset=was_reset)
        return state, batch_index, was_reset

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpointing, "restore_checked", keep_restored)
        train.train_and_evaluate(reset, workdir)
    assert "The optimizer state was reset" in capsys.readouterr().out
    assert restored["reset"] is True
    assert restored["batch_index"] == 2
    state = restored["state"]
    assert int(state.step) == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    adam = state.opt_state[1][0]
    assert int(adam.count) == 0
    assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(adam.mu))
    assert int(saved["opt_state"][1][0]["count"]) == 2
