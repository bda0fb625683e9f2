"""Multi-process training: two local processes joined by jax.distributed on 127.0.0.1.

Each process runs `python -m cyb_jax.main` with one CPU device and CPU
collectives (Gloo, the jax 0.10 default). The pair must train exactly like one
process with two devices.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import ce as ce_config
from cyb_jax import checkpointing
from cyb_jax import data
from cyb_jax import distributed
from cyb_jax import model as model_lib
from cyb_jax import sharding
from cyb_jax import train

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = [
    "--config=configs/ce.py",
    "--config.data.seq_len=32",
    "--config.data.batch_size=4",
    "--config.data.eval_max_batches=2",
    "--config.model.num_layers=1",
    "--config.model.d_model=32",
    "--config.model.num_heads=2",
    "--config.model.mlp_dim=64",
    "--config.total_steps=4",
    "--config.eval_every=4",
    "--config.checkpoint_every=2",
    "--config.log_every=1",
    "--config.optimizer.warmup_steps=1",
]
TIMEOUT_SECONDS = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(device_count: int) -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "TPU_WORKER"))
    }
    environment["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    environment["JAX_PLATFORMS"] = "cpu"
    return environment


def _main_command(workdir, data_dir, *extra):
    return [
        sys.executable,
        "-m",
        "cyb_jax.main",
        *TINY_FLAGS,
        f"--config.data.data_dir={data_dir}",
        f"--workdir={workdir}",
        *extra,
    ]


def _train_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    return [record["train/loss"] for record in records if "train/loss" in record]


def _tiny_config(data_dir):
    config = ce_config.get_config()
    for flag in TINY_FLAGS[1:]:
        key, value = flag[len("--config.") :].split("=")
        section, field = key.rsplit(".", 1) if "." in key else ("", key)
        target = config
        for part in section.split(".") if section else []:
            target = target[part]
        target[field] = type(target[field])(value)
    config.data.data_dir = data_dir
    return config


def _checkpoint_params(workdir, config):
    """Restore the newest checkpoint of `workdir` into a state built on this process's one device."""
    model_config = model_lib.from_config(config, data.get_vocabulary(config.data).vocab_size)
    model = model_lib.Transformer(model_config)
    optimizer, _ = train.make_optimizer(config.optimizer, config.total_steps)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.mesh)
    state, shardings = train.init_state(config, model, model_config, optimizer, mesh, rules)
    manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), keep=3)
    step = manager.latest_step()
    target = checkpointing.abstract_target(state, shardings)
    restored, _ = checkpointing.restore(manager, step, target)
    manager.close()
    return step, restored.params


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train the tiny config in one process with two devices, then in two processes."""
    root = tmp_path_factory.mktemp("multihost")
    data_dir = str(root / "tensorflow_datasets")
    single = str(root / "single")
    # The single run also builds the dataset, so the pair does not race to build it.
    result = subprocess.run(
        _main_command(single, data_dir, "--distributed=off"),
        cwd=REPOSITORY,
        env=_environment(2),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    pair = str(root / "pair")
    port = _free_port()
    processes = [
        subprocess.Popen(
            _main_command(
                pair,
                data_dir,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={index}",
                "--initialization_timeout=60",
            ),
            cwd=REPOSITORY,
            env=_environment(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_SECONDS)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for index, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"process {index} failed:\n{output[-4000:]}"
    return {"single": single, "pair": pair, "data_dir": data_dir, "outputs": outputs}


def test_pair_losses_match_one_process(runs):
    pair_losses = _train_losses(runs["pair"])
    single_losses = _train_losses(runs["single"])
    assert len(pair_losses) == 4
    np.testing.assert_allclose(pair_losses, single_losses, rtol=1e-5)


def test_pair_runs_as_two_processes(runs):
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} over 2 process(es)" in runs["outputs"][0]
    # Only process 0 prints and writes metrics and the summary.
    assert "Summary written" in runs["outputs"][0]
    assert "Summary written" not in runs["outputs"][1]


def test_pair_checkpoint_restores_in_one_process(runs):
    config = _tiny_config(runs["data_dir"])
    pair_step, pair_params = _checkpoint_params(runs["pair"], config)
    single_step, single_params = _checkpoint_params(runs["single"], config)
    assert pair_step == single_step == 4
    for path, value in jax.tree_util.tree_flatten_with_path(pair_params)[0]:
        expected = single_params
        for entry in path:
            expected = expected[entry.key]
        np.testing.assert_allclose(
            np.asarray(value), np.asarray(expected), rtol=1e-5, atol=1e-7,
            err_msg=jax.tree_util.keystr(path),
        )


def test_process_shards_are_disjoint_halves(runs):
    config = _tiny_config(runs["data_dir"])
    whole = data.train_batches(config.data)
    halves = [
        data.train_batches(config.data, process_index=index, process_count=2) for index in range(2)
    ]
    for _ in range(4):
        global_batch = next(whole)
        first, second = next(halves[0]), next(halves[1])
        assert first["targets"].shape == (2, 32)
        first_rows = {row.tobytes() for row in first["targets"]}
        second_rows = {row.tobytes() for row in second["targets"]}
        assert not first_rows & second_rows
        for key in global_batch:
            np.testing.assert_array_equal(
                np.concatenate([first[key], second[key]]), global_batch[key]
            )


@pytest.mark.parametrize(
    "environ, flags, expected",
    [
        ({}, {}, None),
        ({}, {"coordinator_address": "10.0.0.1:1234"}, "explicit"),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, {}, "explicit"),
        (
            {
                "SLURM_JOB_ID": "7",
                "SLURM_STEP_NODELIST": "node[01-02]",
                "SLURM_NTASKS": "16",
                "SLURM_PROCID": "3",
                "SLURM_LOCALID": "3",
            },
            {},
            "slurm",
        ),
        (
            {
                "SLURM_JOB_ID": "7",
                "SLURM_STEP_NODELIST": "node01",
                "SLURM_NTASKS": "1",
                "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0",
            },
            {},
            None,
        ),
        ({"SLURM_JOB_ID": "7"}, {}, None),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, {}, "mpi"),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}, "tpu"),
        ({"TPU_WORKER_HOSTNAMES": "w0"}, {}, None),
        ({}, {"tpu_chips": True}, "tpu"),
    ],
)
def test_detect_cluster(environ, flags, expected):
    assert distributed.detect_cluster(environ, **flags) == expected


def test_off_mode_skips_initialization():
    assert distributed.initialize("off", coordinator_address="127.0.0.1:1") is None


def test_invalid_mode_is_rejected():
    with pytest.raises(ValueError, match="Invalid --distributed='maybe'"):
        distributed.initialize("maybe")
