"""Dry runs and setting checks of the launch scripts; gcloud and sbatch are never called."""

import os
import subprocess

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(script, *arguments, environment=None):
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLOUDSDK_")}
    env.update(environment or {})
    return subprocess.run(
        ["bash", os.path.join(REPOSITORY, "launch", script), *arguments],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm.sh", "local.sh"])
def test_help_exits_cleanly(script):
    result = _launch(script, "--help")
    assert result.returncode == 0
    assert "Usage: launch/" in result.stdout


def test_tpu_pod_dry_run_for_four_hosts():
    result = _launch(
        "tpu_pod.sh",
        "--project", "my-project",
        "--zone", "us-central2-b",
        "--accelerator-type", "v4-32",
        "--dry-run",
        "configs/ap.py",
        "--workdir=/mnt/shared/runs/ap",
        "--config.total_steps=1000",
    )
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines() if line.startswith("gcloud")]
    where = "--project=my-project --zone=us-central2-b"
    assert lines[0] == (
        f"gcloud compute tpus tpu-vm create cyb-jax-v4-32 {where} "
        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base"
    )
    # Every later command reaches all four workers of the slice.
    assert all("--worker=all" in line for line in lines[1:])
    assert "python3.11\\ -m\\ venv\\ .venv\\ \\&\\&\\ .venv/bin/pip\\ install" in lines[-2]
    assert lines[-1].endswith(
        "--command=cd\\ cyb_jax\\ \\&\\&\\ .venv/bin/python\\ -m\\ cyb_jax.main\\ --config=configs/ap.py"
        "\\ --workdir=/mnt/shared/runs/ap\\ --config.total_steps=1000"
    )


def test_tpu_pod_names_missing_settings():
    result = _launch("tpu_pod.sh", "--zone", "us-central2-b", "--dry-run", "configs/ap.py")
    assert result.returncode == 2
    assert "--project (or CLOUDSDK_CORE_PROJECT)" in result.stderr
    assert "--accelerator-type" in result.stderr
    assert "--zone" not in result.stderr.split("setting(s):")[1].split(".")[0]


def test_tpu_pod_reads_project_and_zone_from_environment():
    result = _launch(
        "tpu_pod.sh",
        "--accelerator-type", "v5litepod-16",
        "--dry-run",
        "configs/ce.py",
        environment={"CLOUDSDK_CORE_PROJECT": "env-project", "CLOUDSDK_COMPUTE_ZONE": "europe-west4-b"},
    )
    assert result.returncode == 0, result.stderr
    assert "--project=env-project --zone=europe-west4-b" in result.stdout


def test_slurm_dry_run_for_two_nodes_eight_gpus():
    result = _launch(
        "slurm.sh", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
        "--dry-run", "configs/ap.py", "--workdir=runs/ap_slurm",
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert "#SBATCH --nodes=2\n" in script
    assert "#SBATCH --ntasks-per-node=4\n" in script
    assert "#SBATCH --gpus-per-task=1\n" in script
    assert "#SBATCH --partition=gpu\n" in script
    assert "# 8 processes over 8 GPUs." in script
    assert "JAX_LOCAL_DEVICE_IDS" not in script
    assert "srun python3 -m cyb_jax.main --config=configs/ap.py --workdir=runs/ap_slurm\n" in script


def test_slurm_per_node_sees_all_gpus():
    result = _launch(
        "slurm.sh", "--nodes", "2", "--processes", "per-node", "--dry-run", "configs/ce.py"
    )
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --ntasks-per-node=1\n" in result.stdout
    assert "#SBATCH --gpus-per-node=8\n" in result.stdout
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7\n" in result.stdout
    assert "# 2 processes over 16 GPUs." in result.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["configs/ap.py"], "missing required setting(s): --nodes"),
        (["--nodes", "two", "configs/ap.py"], "invalid count 'two'"),
        (["--nodes", "2", "--processes", "per-core", "configs/ap.py"], "invalid --processes 'per-core'"),
        (["--nodes", "2", "configs/nope.py"], "config file 'configs/nope.py' not found"),
    ],
)
def test_slurm_rejects_bad_settings(arguments, message):
    result = _launch("slurm.sh", "--dry-run", *arguments)
    assert result.returncode == 2
    assert message in result.stderr
