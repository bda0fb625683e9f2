"""End-to-end tests of the training loop on the bundled corpus with a tiny model."""

import json
import math
import os

import jax
import numpy as np
import pytest

from configs import ap as ap_config
from configs import ce as ce_config
from cyb_jax import train
from tests import tiny


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tensorflow_datasets"))


def _tiny(config, data_dir, **overrides):
    defaults = {
        "data.eval_max_batches": 2,
        "total_steps": 6,
        "eval_every": 3,
        "checkpoint_every": 3,
        "optimizer.warmup_steps": 2,
    }
    return tiny.configure(config, data_dir, **{**defaults, **overrides})


def _tiny_ap(data_dir, **overrides):
    return _tiny(ap_config.get_config(), data_dir, **{"pause.window": 2, **overrides})


def test_summary_has_reported_quantities(data_dir, tmp_path):
    workdir = str(tmp_path / "ap")
    summary = train.train_and_evaluate(_tiny_ap(data_dir), workdir)
    with open(os.path.join(workdir, "summary.json")) as handle:
        saved = json.load(handle)
    assert saved["step"] == 6
    assert saved["tokens_seen"] == 6 * 4 * 32
    assert math.isclose(saved["eval/perplexity"], math.exp(saved["eval/nll"]), rel_tol=1e-9)
    for step in range(2):
        assert saved[f"eval/perplexity_step_{step}"] > 1.0
    assert 0.0 <= saved["eval/mean_pauses"] <= 1.0
    assert saved["eval/unigram_perplexity"] > 1.0
    assert saved == json.loads(json.dumps(summary))


def test_metrics_jsonl_and_tensorboard_written(data_dir, tmp_path):
    workdir = str(tmp_path / "ce")
    train.train_and_evaluate(_tiny(ce_config.get_config(), data_dir), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    eval_steps = [r["step"] for r in records if "eval/perplexity" in r]
    assert eval_steps == [3, 6]
    assert all(r["pause/mean_pauses"] == 0.0 for r in records if "train/loss" in r)
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    with open(os.path.join(workdir, "config.json")) as handle:
        assert json.load(handle)["loss"]["name"] == "ce"


def test_rerun_resumes_to_same_parameters(data_dir, tmp_path, capsys):
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(_tiny_ap(data_dir), straight)

    resumed = str(tmp_path / "resumed")
    train.train_and_evaluate(_tiny_ap(data_dir, total_steps=3), resumed)
    capsys.readouterr()
    train.train_and_evaluate(_tiny_ap(data_dir), resumed)
    assert "Resuming from the checkpoint at step 3" in capsys.readouterr().out

    step_a, params_a = tiny.final_params(straight)
    step_b, params_b = tiny.final_params(resumed)
    assert step_a == step_b == 6
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_finished_run_only_reevaluates(data_dir, tmp_path, capsys):
    workdir = str(tmp_path / "done")
    first = train.train_and_evaluate(_tiny_ap(data_dir, total_steps=3), workdir)
    again = train.train_and_evaluate(_tiny_ap(data_dir, total_steps=3), workdir)
    assert "already reached total_steps=3" in capsys.readouterr().out
    assert again["step"] == 3
    assert math.isclose(again["eval/perplexity"], first["eval/perplexity"], rel_tol=1e-6)


def test_init_from_copies_matching_parameters(data_dir, tmp_path, capsys):
    source = str(tmp_path / "source")
    train.train_and_evaluate(_tiny(ce_config.get_config(), data_dir, total_steps=3), source)
    _, source_params = tiny.final_params(source)
    target = str(tmp_path / "target")
    config = _tiny_ap(
        data_dir,
        total_steps=1,
        init_from=source,
        **{"optimizer.learning_rate": 1e-12, "model.num_layers": 2},
    )
    capsys.readouterr()
    train.train_and_evaluate(config, target)
    output = capsys.readouterr().out
    _, target_params = tiny.final_params(target)

    # Every parameter path is printed at the default verbosity, loaded or skipped.
    loaded = [
        line for line in output.splitlines() if line.startswith(f"init_from {source} (step 3)")
    ]
    assert len(loaded) == 1
    source_paths = [
        jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(source_params)
    ]
    assert f"loaded {len(source_paths)} parameters" in loaded[0]
    for path in source_paths:
        assert path in loaded[0]
    skipped = [line for line in output.splitlines() if line.startswith("WARNING: init_from")]
    assert len(skipped) == 1
    target_paths = [
        jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(target_params)
    ]
    fresh = [path for path in target_paths if path not in source_paths]
    assert any("layer_1" in path for path in fresh)
    assert f"{len(fresh)} parameters have no match" in skipped[0]
    for path in fresh:
        assert path in skipped[0]
    assert "['layer_1']['mlp']['up']['kernel'] (shape (32, 64))" in skipped[0]
    # With a vanishing learning rate the copied weights stay the source's.
    np.testing.assert_allclose(
        np.asarray(target_params["layer_0"]["mlp"]["up"]["kernel"]),
        np.asarray(source_params["layer_0"]["mlp"]["up"]["kernel"]),
        rtol=1e-6,
        atol=1e-9,
    )


def test_collapse_warning_names_countermeasures():
    results = {
        "eval/mean_pauses": 0.01,
        "eval/perplexity_step_0": 20.0,
        "eval/perplexity_step_1": 15.0,
    }
    better_later = train.collapse_warning(results, 2, "ap")
    assert better_later is not None
    assert "step_ce_weight" in better_later
    assert "would be better" in better_later
    untrained = train.collapse_warning({**results, "eval/perplexity_step_1": 25.0}, 2, "ap")
    assert untrained is not None
    assert "no longer trained" in untrained
    assert train.collapse_warning({**results, "eval/mean_pauses": 0.3}, 2, "ap") is None
    assert train.collapse_warning(results, 2, "pause_ce") is None
    assert train.collapse_warning(results, 1, "ap") is None
