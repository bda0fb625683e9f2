"""Tests of cached decoding: equivalence with the training forward, batching, pauses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cyb_jax import decode
from cyb_jax import model

VOCAB = 40
WINDOW = 3
PROMPTS = ([5, 9, 13, 7, 22], [31, 4], [8, 17, 3])


def _config(visibility, **overrides):
    settings = dict(
        vocab_size=VOCAB,
        window=WINDOW,
        num_layers=2,
        d_model=32,
        num_heads=2,
        mlp_dim=48,
        pause_visibility=visibility,
        vocab_multiple=64,
        # With d near 0.5 the threshold rule waits on some steps and not on others.
        dk_prior=0.5,
    )
    settings.update(overrides)
    return model.TransformerConfig(**settings)


def _params(config):
    tokens = jnp.zeros((1, 4), jnp.int32)
    positions = jnp.arange(4)[None, :]
    variables = model.Transformer(config).init(jax.random.key(3), tokens, positions, tokens + 1)
    return nn.meta.unbox(variables["params"])


def _full_forward(params, config, fed_ids):
    tokens = jnp.asarray([fed_ids], jnp.int32)
    positions = jnp.arange(len(fed_ids))[None, :]
    logits = model.Transformer(config).apply({"params": params}, tokens, positions, tokens * 0 + 1)
    return np.asarray(logits[0])


def _check_against_full_forward(params, config, result):
    fed = [decode.START_ID, *result.prompt_ids, *result.token_ids[:-1]]
    full_LxWxV1 = _full_forward(params, config, fed)
    assert result.step_logits, "no logits were recorded"
    for (token_index, step), logits in result.step_logits.items():
        np.testing.assert_allclose(
            logits, full_LxWxV1[token_index, step], atol=2e-5, rtol=2e-5,
            err_msg=f"slot ({token_index}, {step})",
        )


@pytest.mark.parametrize("visibility", ["visible", "private"])
def test_cached_logits_match_full_forward(visibility):
    config = _config(visibility)
    params = _params(config)
    results = decode.generate(
        params, config, PROMPTS, max_new_tokens=8, record_logits=True
    )
    pauses = np.concatenate([result.pauses for result in results])
    assert pauses.min() == 0, "the test needs tokens without pauses"
    assert pauses.max() > 0, "the test needs tokens with pauses"
    for result in results:
        assert len(result.token_ids) == 8
        _check_against_full_forward(params, config, result)


def test_private_runs_pauses_on_demand():
    config = _config("private")
    params = _params(config)
    (result,) = decode.generate(params, config, [PROMPTS[0]], max_new_tokens=8, record_logits=True)
    fed_tokens = 1 + len(PROMPTS[0]) + len(result.token_ids) - 1
    # One real slot per fed token, plus the pauses spent on each prediction.
    assert result.slots_run == fed_tokens + sum(result.pauses)
    assert result.fixed_slots == fed_tokens * WINDOW
    assert len(result.step_logits) == result.slots_run
    # Pauses run only for the predicted tokens: the last prompt token and the generated ones.
    paused = sorted({n for (n, step) in result.step_logits if step > 0})
    assert paused and min(paused) >= len(PROMPTS[0])


@pytest.mark.parametrize("visibility", ["visible", "private"])
def test_batch_decodes_as_each_prompt_alone(visibility):
    config = _config(visibility)
    params = _params(config)
    batched = decode.generate(params, config, PROMPTS, max_new_tokens=6, record_logits=True)
    for prompt, together in zip(PROMPTS, batched):
        (alone,) = decode.generate(params, config, [prompt], max_new_tokens=6, record_logits=True)
        assert together.token_ids == alone.token_ids
        assert together.pauses == alone.pauses
        assert together.slots_run == alone.slots_run
        assert together.step_logits.keys() == alone.step_logits.keys()
        for slot, logits in alone.step_logits.items():
            np.testing.assert_allclose(together.step_logits[slot], logits, atol=2e-5, rtol=2e-5)


def test_eos_stops_only_its_row():
    config = _config("visible")
    params = _params(config)
    reference = decode.generate(params, config, PROMPTS, max_new_tokens=6)
    eos_id = reference[0].token_ids[2]
    results = decode.generate(params, config, PROMPTS, max_new_tokens=6, eos_id=eos_id)
    for before, after in zip(reference, results):
        stop = before.token_ids.index(eos_id) + 1 if eos_id in before.token_ids else 6
        assert after.token_ids == before.token_ids[:stop]
        assert after.pauses == before.pauses[:stop]


def test_pause_threshold_extremes():
    config = _config("private")
    params = _params(config)
    never = decode.SamplingOptions(pause_threshold=1.0)
    always = decode.SamplingOptions(pause_threshold=0.0)
    (quick,) = decode.generate(params, config, [PROMPTS[1]], max_new_tokens=4, options=never)
    (slow,) = decode.generate(params, config, [PROMPTS[1]], max_new_tokens=4, options=always)
    assert quick.pauses == [0] * 4
    assert slow.pauses == [WINDOW - 1] * 4
    assert slow.slots_run == slow.fixed_slots - (len(PROMPTS[1]) + 1 - 1) * (WINDOW - 1)


def test_sampled_tokens_respect_top_k():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 2.5, -1.0, 9.0])  # the last entry is DK
    options = decode.SamplingOptions(temperature=1.0, top_k=2)
    picks = {decode.choose_token(logits, options, rng) for _ in range(200)}
    assert picks == {1, 2}
    greedy = decode.choose_token(logits, decode.SamplingOptions(), rng)
    assert greedy == 1


def test_render_pauses_marks():
    pieces = [" To", " be", ",", " or"]
    plain = decode.render_pauses(pieces, [0, 2, 0, 1], colour=False)
    assert plain == " To be[2], or[1]"
    coloured = decode.render_pauses(pieces, [0, 2, 0, 3], colour=True)
    assert "\x1b[48;5;215m\x1b[30m be\x1b[0m" in coloured
    assert "\x1b[48;5;203m\x1b[30m or\x1b[0m" in coloured
    assert coloured.startswith(" To")
