"""Tests of the analyses: the numbers behind each figure, and the files written."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from cyb_jax import analyze
from cyb_jax import model

VOCAB = 30
WINDOW = 3
LENGTH = 12


def _config(**overrides):
    settings = dict(
        vocab_size=VOCAB, window=WINDOW, num_layers=1, d_model=16, num_heads=2, mlp_dim=24,
        vocab_multiple=64, dk_prior=0.5,
    )
    settings.update(overrides)
    return model.TransformerConfig(**settings)


def _batches():
    """Two batches of two packed rows: two segments per row and padding at the end."""
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        targets = rng.integers(3, 8, size=(2, LENGTH)).astype(np.int32)
        segments = np.array([[1] * 5 + [2] * 5 + [0] * 2] * 2, np.int32)
        positions = np.array([list(range(5)) * 2 + [0, 0]] * 2, np.int32)
        inputs = np.where(positions > 0, np.roll(targets, 1, axis=1), 0).astype(np.int32)
        targets = np.where(segments > 0, targets, 0)
        weights = (segments > 0).astype(np.float32)
        batches.append(
            dict(inputs=inputs, targets=targets, positions=positions, segment_ids=segments,
                 weights=weights)
        )
    return batches


@pytest.fixture(scope="module")
def setup():
    config = _config()
    batch = _batches()[0]
    variables = model.Transformer(config).init(
        jax.random.key(0), jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
        jnp.asarray(batch["segment_ids"]),
    )
    params = nn.meta.unbox(variables["params"])
    records = analyze.collect_records(params, config, "ap", _batches())
    return config, params, records


def _direct(config, params):
    """Compute t_i, d_i and the halting distribution s_i with numpy from the full logits."""
    targets, d_rows, t_rows = [], [], []
    for batch in _batches():
        logits = np.asarray(
            model.Transformer(config).apply(
                {"params": params}, jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                jnp.asarray(batch["segment_ids"]),
            ),
            np.float64,
        )
        keep = batch["weights"] > 0
        logits = logits[keep]  # [N, W, V + 1]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        dont_know = probs[..., VOCAB]
        real = probs[..., :VOCAB] / probs[..., :VOCAB].sum(-1, keepdims=True)
        target = batch["targets"][keep]
        t_rows.append(real[np.arange(target.size), :, target])
        d_rows.append(dont_know)
        targets.append(target)
    dont_know = np.concatenate(d_rows)
    target_probs = np.concatenate(t_rows)
    halting = np.zeros_like(dont_know)
    survival = np.ones(dont_know.shape[0])
    for i in range(WINDOW):
        answer = 1.0 - dont_know[:, i] if i < WINDOW - 1 else np.ones_like(survival)
        halting[:, i] = survival * answer
        survival = survival * dont_know[:, i]
    return np.concatenate(targets), target_probs, dont_know, halting


def test_records_match_direct_computation(setup):
    config, params, records = setup
    targets, target_probs, dont_know, halting = _direct(config, params)
    assert records.targets.tolist() == targets.tolist()
    np.testing.assert_allclose(records.target_probs, target_probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(records.dont_know, dont_know, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(records.stop, halting, rtol=1e-4, atol=1e-6)
    expected_pauses = halting @ np.arange(WINDOW)
    np.testing.assert_allclose(records.pauses, expected_pauses, rtol=1e-4, atol=1e-6)
    mixture = -np.log(np.sum(halting * target_probs, axis=1))
    np.testing.assert_allclose(records.nll, mixture, rtol=1e-4, atol=1e-5)


def test_latency_matches_direct_computation(setup):
    config, params, records = setup
    _, _, _, halting = _direct(config, params)
    expected_pauses = halting @ np.arange(WINDOW)
    result = analyze.latency(records)
    counts, _ = np.histogram(expected_pauses, bins=result["histogram_edges"])
    assert result["histogram_counts"].tolist() == counts.tolist()
    assert result["histogram_counts"].sum() == records.targets.size
    np.testing.assert_allclose(result["mean_stop"], halting.mean(axis=0), rtol=1e-4, atol=1e-6)
    assert result["mean_pauses"] == pytest.approx(expected_pauses.mean(), rel=1e-4)


def test_calibration_matches_direct_spearman(setup):
    config, params, records = setup
    _, target_probs, dont_know, _ = _direct(config, params)
    result = analyze.calibration(records)
    assert len(result["spearman"]) == WINDOW - 1
    for i in range(WINDOW - 1):
        gain = target_probs[:, i + 1] - target_probs[:, i]
        np.testing.assert_allclose(result["gain"][:, i], gain, atol=1e-5)
        np.testing.assert_allclose(result["dont_know"][:, i], dont_know[:, i], rtol=1e-4)
        # Spearman's rho is the Pearson correlation of the ranks. It is taken on the
        # recorded float32 values, because float64 values reorder near-ties.
        recorded_gain = records.target_probs[:, i + 1] - records.target_probs[:, i]
        ranks_d = scipy.stats.rankdata(records.dont_know[:, i])
        ranks_gain = scipy.stats.rankdata(recorded_gain)
        expected = np.corrcoef(ranks_d, ranks_gain)[0, 1]
        assert result["spearman"][i] == pytest.approx(expected, abs=1e-9)


def test_perplexities_match_direct_computation(setup):
    config, params, records = setup
    _, target_probs, _, halting = _direct(config, params)
    result = analyze.perplexities(records)
    mixture = np.exp(np.mean(-np.log(np.sum(halting * target_probs, axis=1))))
    assert result["read-out (mixture)"] == pytest.approx(mixture, rel=1e-4)
    for i in range(WINDOW):
        assert result[f"step {i}"] == pytest.approx(np.exp(-np.log(target_probs[:, i]).mean()), rel=1e-4)


def _synthetic_records(pauses_by_token):
    targets = np.concatenate([[token] * len(values) for token, values in pauses_by_token.items()])
    pauses = np.concatenate([values for values in pauses_by_token.values()]).astype(np.float64)
    size = targets.size
    ones = np.ones((size, WINDOW))
    return analyze.TokenRecords(
        targets=targets, rows=np.zeros(size, int), segments=np.ones(size, int),
        target_probs=ones / 2, dont_know=ones / 2, stop=ones / WINDOW, pauses=pauses,
        nll=np.ones(size), step_nll=ones, self_paced_nll=None, self_paced_pauses=None,
    )


def test_token_table_groups_by_median_and_variance():
    records = _synthetic_records(
        {
            1: [0.0, 0.0, 0.1, 0.1],  # low median, low variance
            2: [0.0, 0.0, 0.0, 0.8],  # low median, high variance
            3: [1.9, 2.0, 2.0, 2.1],  # high median, low variance
            4: [1.0, 2.0, 2.0, 3.0],  # high median, high variance
            5: [2.0],  # too rare
        }
    )
    table = analyze.token_table(records, min_count=4, per_group=5)
    groups = {entry["token"]: (entry["median_level"], entry["variance_level"]) for entry in table}
    assert groups == {1: ("low", "low"), 2: ("low", "high"), 3: ("high", "low"), 4: ("high", "high")}
    by_token = {entry["token"]: entry for entry in table}
    assert by_token[4]["count"] == 4
    assert by_token[4]["median"] == pytest.approx(2.0)
    assert by_token[4]["variance"] == pytest.approx(np.var([1.0, 2.0, 2.0, 3.0]))


def test_analysis_writes_every_file(setup, tmp_path):
    _, _, records = setup
    curves = {"train/nll": ([10, 20], [3.0, 2.5]), "eval/perplexity": ([20], [12.0])}
    out_dir = tmp_path / "run_a" / "analysis"
    numbers = analyze.write_analysis(
        records, str(out_dir), run_name="run_a", loss_name="ap", piece_of=lambda token: f"<{token}>",
        curves=curves, source="test batches",
    )
    for name, _ in analyze.FIGURES:
        with open(out_dir / name, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", name
    report = (out_dir / "report.md").read_text()
    for name, _ in analyze.FIGURES:
        assert f"({name})" in report
    assert f"{numbers['perplexity']['read-out (mixture)']:.3f}" in report
    assert "passages.html" in report
    passages = (out_dir / "passages.html").read_text()
    assert passages.count('class="passage"') == 4
    assert "&lt;5&gt;" in passages or "&lt;3&gt;" in passages
    assert (out_dir / "tokens.md").exists()
    saved = json.loads((out_dir / "numbers.json").read_text())
    assert saved["tokens"] == records.targets.size

    comparison = tmp_path / "comparison"
    analyze.write_comparison(
        {"run_a": numbers, "run_b": numbers}, {"run_a": curves, "run_b": curves}, str(comparison)
    )
    assert sorted(os.listdir(comparison)) == ["learning_curves.png", "perplexity.png", "report.md"]
    assert "| run_b | ap |" in (comparison / "report.md").read_text()
