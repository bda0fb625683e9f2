"""Tests of command-line and config checks: each bad input fails with a message naming the fix."""

import os
import subprocess
import sys

import pytest

from configs import ap as ap_config
from configs import ce as ce_config
from cyb_jax import configuration

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_missing_config_suggests_close_name():
    with pytest.raises(configuration.ConfigError) as error:
        configuration.check_command_line(["--config=configs/vaa.py"])
    message = str(error.value)
    assert "'configs/vaa.py' not found" in message
    assert "--config=configs/va.py" in message


def test_lookalike_character_is_named():
    with pytest.raises(configuration.ConfigError) as error:
        configuration.check_command_line(["--config=configs/v\u0430.py"])
    message = str(error.value)
    assert "U+0430 CYRILLIC SMALL LETTER A" in message
    assert "position 9" in message
    assert "did you mean --config=configs/va.py" in message


def test_unknown_override_key_suggests_field():
    with pytest.raises(configuration.ConfigError) as error:
        configuration.check_command_line(["--config=configs/ap.py", "--config.totl_steps=3"])
    assert "Unknown config field --config.totl_steps" in str(error.value)
    assert "Did you mean --config.total_steps?" in str(error.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.total_steps=abc", "expected a number of type int"),
        ("--config.optimizer.learning_rate=fast", "expected a number of type float"),
        ("--config.mesh.rules=((", "expected a Python literal"),
    ],
)
def test_malformed_value_is_rejected(override, expected):
    with pytest.raises(configuration.ConfigError) as error:
        configuration.check_command_line(["--config=configs/ap.py", override])
    assert expected in str(error.value)
    assert override.split("=")[0] in str(error.value)


def test_valid_command_line_passes():
    configuration.check_command_line(
        ["--config=configs/ap.py", "--config.total_steps=20", "--config.model.dk_prior=0.5"]
    )


def test_validate_rejects_inconsistent_fields():
    config = ce_config.get_config()
    config.pause.window = 4
    with pytest.raises(configuration.ConfigError, match="pause.window=1"):
        configuration.validate(config)
    config = ap_config.get_config()
    config.model.dk_prior = 1.5
    with pytest.raises(configuration.ConfigError, match="dk_prior"):
        configuration.validate(config)
    config = ap_config.get_config()
    config.loss.world_stop = "0:0:1"
    with pytest.raises(configuration.ConfigError, match="world_stop"):
        configuration.validate(config)
    config = ap_config.get_config()
    config.model.num_heads = 3
    with pytest.raises(configuration.ConfigError, match="num_heads"):
        configuration.validate(config)
    config = ap_config.get_config()
    config.model.attention = "flash"
    with pytest.raises(
        configuration.ConfigError,
        match="model.attention='flash' is invalid; expected one of fused, reference",
    ):
        configuration.validate(config)


def test_command_line_errors_exit_before_training():
    result = subprocess.run(
        [sys.executable, "-m", "cyb_jax.main", "--config=configs/ap.py", "--config.totl_steps=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Error: Unknown config field --config.totl_steps" in result.stderr
    assert "Traceback" not in result.stderr


def test_single_value_for_tuple_field_is_rejected():
    with pytest.raises(configuration.ConfigError) as error:
        configuration.check_command_line(["--config=configs/ap.py", "--config.mesh.rules=3"])
    message = str(error.value)
    assert "--config.mesh.rules" in message
    assert "got a single int" in message
    assert "(value,)" in message


def test_none_literal_only_for_nullable_fields():
    with pytest.raises(configuration.ConfigError) as error:
        configuration.check_command_line(["--config=configs/ap.py", "--config.init_from=None"])
    assert "--config.init_from" in str(error.value)
    assert "cannot be None" in str(error.value)
    configuration.check_command_line(["--config=configs/ap.py", "--config.data.data_dir=none"])

    config = ap_config.get_config()
    config.data.data_dir = "None"
    configuration.validate(config)
    assert config.data.data_dir is None


def test_validate_rejects_none_field():
    config = ap_config.get_config()
    config.optimizer.clip_norm = None
    with pytest.raises(configuration.ConfigError) as error:
        configuration.validate(config)
    message = str(error.value)
    assert "config.optimizer.clip_norm is None" in message
    assert "data.data_dir" in message


@pytest.mark.parametrize(
    "rules, expected",
    [
        (
            (("act_batch", "data fsdp"),),
            "Several mesh axes are written as a tuple, e.g. ('data', 'fsdp')",
        ),
        ((("act_batch", "data,fsdp"),), "'data,fsdp', which is not a mesh axis"),
        ((("embed", "fsdp"), 3), "config.mesh.rules entry 3 is invalid"),
        (
            (("embed", ("fsdp", 2)),),
            "expected a mesh axis name, a tuple of mesh axis names or None",
        ),
        ((("embed", "tensr"),), "'tensr', which is not a mesh axis"),
    ],
)
def test_validate_rejects_malformed_mesh_rules(rules, expected):
    config = ap_config.get_config()
    config.mesh.rules = rules
    with pytest.raises(configuration.ConfigError) as error:
        configuration.validate(config)
    assert expected in str(error.value)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("world_stop", "0:1", "must have 4 entries"),
        ("world_stop", "0:0:-1:2", "must be non-negative"),
        ("prior", "0:0:0:0", "must have a positive total"),
        ("prior", "1:x:1:1", "must be numbers separated by ':'"),
    ],
)
def test_validate_rejects_bad_distributions(field, value, expected):
    config = ap_config.get_config()
    config.loss[field] = value
    with pytest.raises(configuration.ConfigError) as error:
        configuration.validate(config)
    message = str(error.value)
    assert f"config.loss.{field}={value!r} is invalid" in message
    assert expected in message
    assert f"--config.loss.{field}=1:1:1:1" in message


def test_config_file_loads_from_outside_the_repository(tmp_path):
    path = os.path.join(REPOSITORY, "configs", "va.py")
    script = (
        f"from cyb_jax import configuration; print(configuration.load_config_file({path!r}).name)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "va"
