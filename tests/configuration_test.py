"""Tests of command-line and config checks: each bad input fails with a message naming the fix."""

import subprocess
import sys

import pytest

from configs import ap as ap_config
from configs import ce as ce_config
from cyb_jax import configuration


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
