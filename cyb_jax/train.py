"""The training loop: state, a pure train step, evaluation and checkpoints.

`train_and_evaluate` reads top to bottom in phases: set up data and model, build
or restore the sharded state, then alternate train steps with periodic
evaluation and checkpointing, and finish with a summary. The step functions are
pure; the loss variant enters only through the objective passed to them.
"""

import functools
import json
import math
import os
import time
from typing import Any, Iterator

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from cyb_jax import checkpointing
from cyb_jax import configuration
from cyb_jax import data
from cyb_jax import model as model_lib
from cyb_jax import objective as objective_lib
from cyb_jax import preemption
from cyb_jax import sharding
from cyb_jax import writers

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so that checkpoints hold plain arrays


def make_optimizer(optimizer_config: ml_collections.ConfigDict, total_steps: int):
    """AdamW with linear warm-up, cosine decay and global-norm clipping."""
    peak = optimizer_config.learning_rate
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=min(optimizer_config.warmup_steps, max(total_steps - 1, 0)),
        decay_steps=max(total_steps, 1),
        end_value=peak * optimizer_config.min_lr_ratio,
    )
    # Norm scales and other vectors are not decayed.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    optimizer = optax.chain(
        optax.clip_by_global_norm(optimizer_config.clip_norm),
        optax.adamw(
            schedule,
            b1=optimizer_config.b1,
            b2=optimizer_config.b2,
            weight_decay=optimizer_config.weight_decay,
            mask=decay_mask,
        ),
    )
    return optimizer, schedule


# Optimizer settings that define what the saved optimizer state means. b1 and b2 set the
# averaging horizons of Adam's first and second moments, and the bias correction divides
# by 1 - b**count. Moments accumulated under other values are therefore wrong for new ones.
# The other settings (learning rate and its schedule, weight_decay, clip_norm) only scale
# or clip the update computed from that state, so changing them on resume is harmless.
OPTIMIZER_DEFINITION_FIELDS = ("b1", "b2")


def optimizer_definition(optimizer_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Return the optimizer settings that a checkpoint records next to the optimizer state."""
    return {
        "name": "adamw",
        **{name: optimizer_config[name] for name in OPTIMIZER_DEFINITION_FIELDS},
    }


def train_step(
    state: TrainState, batch, *, model, optimizer, objective, sample_grants=None, skip_nonfinite=False
):
    """One optimizer step; returns the new state and this step's scalar metrics.

    `sample_grants(key, shape)`, when given, draws each token's granted pause steps
    (pause recipe 'sampled') from the state's key folded with the step. With
    `skip_nonfinite`, an update whose loss or gradient norm is NaN or Inf is
    computed but not applied, and metrics["skipped"] is 1 for it and 0 otherwise.
    """
    granted = None
    if sample_grants is not None:
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        granted = sample_grants(step_key, batch["inputs"].shape)

    def loss_of(params):
        log_probs = model.apply(
            {"params": params},
            batch["inputs"],
            batch["positions"],
            batch["segment_ids"],
            granted,
            targets_BxL=batch["targets"],
        )
        return objective(log_probs, batch["targets"], batch["weights"], state.step, granted)

    (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if skip_nonfinite:
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep_if_finite = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree.map(keep_if_finite, params, state.params)
        opt_state = jax.tree.map(keep_if_finite, opt_state, state.opt_state)
        metrics["skipped"] = jnp.where(finite, 0.0, 1.0)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params, batch, *, model, model_config, loss_name):
    """Weighted sums over the batch of every per-token statistic, and the token count."""
    log_probs = model.apply(
        {"params": params},
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        targets_BxL=batch["targets"],
    )
    stats = objective_lib.token_statistics(log_probs, loss_name)
    weights = batch["weights"]
    sums = {name: jnp.sum(value * weights) for name, value in stats.items()}
    sums["tokens"] = jnp.sum(weights)
    return sums


def summarize_eval(sums: dict[str, float], window: int) -> dict[str, float]:
    """Turn evaluation sums into the reported means and perplexities."""
    tokens = max(sums["tokens"], 1.0)
    mean = {name: value / tokens for name, value in sums.items() if name != "tokens"}
    result = {
        "eval/tokens": sums["tokens"],
        "eval/nll": mean["nll"],
        "eval/perplexity": math.exp(mean["nll"]),
    }
    for i in range(window):
        result[f"eval/perplexity_step_{i}"] = math.exp(mean[f"nll_step_{i}"])
    result["eval/mean_pauses"] = mean["pauses"]
    result["eval/pauses_std"] = math.sqrt(max(mean["pauses_squared"] - mean["pauses"] ** 2, 0.0))
    for i in range(window - 1):
        result[f"eval/dk_step_{i}"] = mean[f"dk_step_{i}"]
    if "self_paced_nll" in mean:
        result["eval/self_paced_perplexity"] = math.exp(mean["self_paced_nll"])
        result["eval/self_paced_pauses"] = mean["self_paced_pauses"]
    return result


def train_metrics(metrics: dict[str, Any], window: int) -> dict[str, float]:
    """Rename the objective's batch means to the train/ and pause/ namespaces."""
    scalars = {
        "train/loss": metrics["loss"],
        "train/nll": metrics["nll"],
        "train/grad_norm": metrics["grad_norm"],
    }
    for i in range(window):
        scalars[f"train/nll_step_{i}"] = metrics[f"nll_step_{i}"]
    if "skipped_updates" in metrics:
        scalars["train/skipped_updates"] = metrics["skipped_updates"]
    scalars["pause/mean_pauses"] = metrics["pauses"]
    for i in range(window - 1):
        scalars[f"pause/dk_step_{i}"] = metrics[f"dk_step_{i}"]
    return {name: float(np.asarray(value)) for name, value in scalars.items()}


class NonFiniteError(FloatingPointError):
    """A NaN or Inf training loss or gradient norm."""


def check_finite(metrics: dict[str, Any], step: int, manager) -> None:
    """Raise NonFiniteError naming the first NaN or Inf of the loss and gradient norm at `step`."""
    for name in ("loss", "grad_norm"):
        value = float(np.asarray(metrics[name]))
        if math.isfinite(value):
            continue
        manager.wait_until_finished()
        latest = manager.latest_step()
        resume = (
            f"The newest checkpoint is step {latest} in {manager.directory}; rerunning the "
            "command resumes from it"
            if latest is not None
            else "No checkpoint was saved, so a rerun starts from scratch"
        )
        raise NonFiniteError(
            f"train/{name} is {value} at step {step}. {resume}. Lower "
            "--config.optimizer.learning_rate, or set --config.skip_nonfinite_updates=true "
            "to skip updates with a NaN or Inf loss or gradient norm."
        )


def collapse_warning(results: dict[str, float], window: int, loss_name: str) -> str | None:
    """Describe a collapse to never pausing in eval `results`, or return None.

    A CYB model counts as collapsed below COLLAPSE_PAUSES expected pauses per token.
    The message also says whether the last step would read out better than step 0;
    after a long collapse it usually does not, because the pause steps stop being
    trained once the model never pauses.
    """
    if window == 1 or loss_name in ("ce", "pause_ce"):
        return None
    pauses = results["eval/mean_pauses"]
    if pauses >= objective_lib.COLLAPSE_PAUSES:
        return None
    first = math.log(results["eval/perplexity_step_0"])
    last = math.log(results[f"eval/perplexity_step_{window - 1}"])
    if last < first:
        comparison = f"although reading out at the last step would be better (NLL {last:.4f} < {first:.4f} at step 0)"
    else:
        comparison = f"and the pause steps are no longer trained (NLL {last:.4f} at the last step, {first:.4f} at step 0)"
    return (
        f"Pauses have collapsed: {pauses:.3f} expected pauses per token, {comparison}. Consider "
        "config.loss.step_ce_weight, config.model.dk_prior, config.pause.input='token+code', "
        "config.loss.dk_warmup_steps, or fine-tuning a no-pause model with config.init_from."
    )


class _GlobalBatches:
    """Turn each process's rows into global arrays laid out by the batch sharding."""

    def __init__(self, local_batches: Iterator[dict[str, np.ndarray]], batch_sharding):
        self._local = local_batches
        self._sharding = batch_sharding

    def __iter__(self):
        return self

    def __next__(self):
        local = next(self._local)
        return {
            key: jax.make_array_from_process_local_data(self._sharding, np.asarray(local[key]))
            for key in BATCH_KEYS
        }


def evaluate(params, eval_fn, eval_batches, batch_sharding, window: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    for batch in _GlobalBatches(iter(eval_batches), batch_sharding):
        sums = jax.device_get(eval_fn(params, batch))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return summarize_eval(totals, window)


def init_state(config, model, model_config, optimizer, mesh, rules):
    """Build the state by shape inference, logical specs, shardings, then a jitted init."""
    length = config.data.seq_len

    def init_fn(rng):
        tokens = jnp.zeros((1, length), jnp.int32)
        positions = jnp.arange(length, dtype=jnp.int32)[None, :]
        params = model.init(rng, tokens, positions, jnp.ones_like(tokens))["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(jax.random.key(config.seed + 1)),
        )

    rng = jax.random.key(config.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract_boxed = jax.eval_shape(init_fn, rng)
        shardings = sharding.logical_shardings(abstract_boxed, mesh, rules)
        init_unboxed = lambda key: nn.meta.unbox(init_fn(key))  # noqa: E731
        state = jax.jit(init_unboxed, out_shardings=shardings)(rng)
    return state, shardings


def load_init_params(state: TrainState, source_dir: str, shardings: TrainState) -> TrainState:
    """Copy every parameter whose path and shape match from another run's newest checkpoint."""
    source, source_step = checkpointing.restore_params(source_dir)
    source_flat = dict(jax.tree_util.tree_flatten_with_path(source)[0])
    loaded, skipped = [], []

    def pick(path, current, target_sharding):
        name = jax.tree_util.keystr(path)
        candidate = source_flat.get(path)
        if candidate is not None and tuple(candidate.shape) == tuple(current.shape):
            loaded.append(name)
            return jax.device_put(np.asarray(candidate, dtype=current.dtype), target_sharding)
        skipped.append(f"{name} (shape {tuple(current.shape)})")
        return current

    params = jax.tree_util.tree_map_with_path(pick, state.params, shardings.params)
    writers.log_and_print(
        f"init_from {source_dir} (step {source_step}): loaded {len(loaded)} parameters: "
        f"{', '.join(loaded)}"
    )
    if skipped:
        message = (
            f"init_from {source_dir}: {len(skipped)} parameters have no match of the same path "
            f"and shape in the source and keep their fresh init: {', '.join(skipped)}"
        )
        logging.warning("%s", message)
        writers.log_and_print(f"WARNING: {message}")
    return state.replace(params=params)


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "summary.json")
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, sort_keys=True)
    os.replace(temporary, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train `config` in `workdir`, resuming from its newest checkpoint; return the summary."""
    configuration.validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoint_dir) and any(name.isdigit() for name in os.listdir(checkpoint_dir)):
        for change in configuration.config_changes(config, workdir):
            writers.log_and_print(f"Config changed since the checkpoints were written: {change}")
    configuration.save(config, workdir)
    writers.log_and_print(f"Workdir: {workdir}")

    # Phase 1: data and model.
    vocabulary = data.get_vocabulary(config.data)
    model_config = model_lib.from_config(config, vocabulary.vocab_size)
    model = model_lib.Transformer(model_config)
    window = model_config.window
    loss_name = config.loss.name

    # Phase 2: mesh and sharded state, restored when the workdir has a checkpoint.
    configuration.validate_for_mesh(
        config, jax.device_count(), model_config, process_count=jax.process_count()
    )
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.mesh)
    optimizer, schedule = make_optimizer(config.optimizer, config.total_steps)
    state, state_shardings = init_state(config, model, model_config, optimizer, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    writers.log_and_print(
        f"Model: V={model_config.vocab_size} (+DK, {window - 1} pause codes, table "
        f"{model_config.padded_vocab_size}), W={window}, loss={loss_name}, mesh {dict(mesh.shape)} "
        f"over {jax.process_count()} process(es)"
    )

    manager = checkpointing.make_manager(
        os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
    )
    definition = optimizer_definition(config.optimizer)
    restored = None
    if manager.latest_step() is not None:
        target = checkpointing.abstract_target(state, state_shardings)
        restored = checkpointing.restore_newest_intact(
            manager,
            target,
            fallback=config.restore_fallback,
            optimizer_definition=definition,
            fresh_opt_state=state.opt_state if config.reset_optimizer else None,
        )
        if restored is None:
            writers.log_and_print(
                f"No intact checkpoint is left in {workdir}/checkpoints, so training starts "
                "from scratch."
            )
    if restored is not None:
        state, batch_index, restored_step, reset = restored
        writers.log_and_print(
            f"Resuming from the checkpoint at step {restored_step} in {workdir}/checkpoints."
        )
        if reset:
            writers.log_and_print(
                "The optimizer state was reset because config.reset_optimizer is set and the "
                "checkpoint's optimizer differs; parameters and step are the checkpoint's."
            )
    else:
        batch_index = 0
        if config.init_from:
            state = load_init_params(state, config.init_from, state_shardings)
            writers.log_and_print(f"Initialised parameters from {config.init_from}.")
    start_step = int(state.step)
    parameters = sharding.check_parameter_sharding(state.params, state_shardings.params)
    parameter_count = parameters.count
    writers.log_and_print(f"Parameters: {parameters.describe()}.")

    # Phase 3: compiled steps.
    objective = objective_lib.make_objective(config, model_config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step_fn = jax.jit(
            functools.partial(
                train_step,
                model=model,
                optimizer=optimizer,
                objective=objective,
                sample_grants=objective_lib.make_grant_sampler(config),
                skip_nonfinite=config.skip_nonfinite_updates,
            ),
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=(0,),
        )
        eval_fn = jax.jit(
            functools.partial(
                eval_step, model=model, model_config=model_config, loss_name=loss_name
            ),
            in_shardings=(state_shardings.params, batch_sharding),
            out_shardings=sharding.replicated(mesh),
        )

    eval_batches = data.eval_batches(
        config.data,
        "validation",
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    tokens_per_step = config.data.batch_size * config.data.seq_len
    writer = writers.MetricWriter(workdir)
    progress = writers.Progress(config.total_steps, start_step, tokens_per_step)
    train_batches = _GlobalBatches(
        data.train_batches(
            config.data,
            start_index=batch_index,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ),
        batch_sharding,
    )

    def run_eval(step: int) -> dict[str, float]:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            results = evaluate(state.params, eval_fn, eval_batches, batch_sharding, window)
        writer.write(step, results)
        message = collapse_warning(results, window, loss_name)
        if message:
            logging.warning("%s", message)
            writers.log_and_print(f"WARNING: {message}")
        writers.log_and_print(
            f"eval at step {step}: perplexity {results['eval/perplexity']:.3f}, "
            f"mean pauses {results['eval/mean_pauses']:.3f}"
        )
        return results

    # Phase 4: the loop. Metrics of step k are fetched after step k + 1 is dispatched,
    # so the host does not wait on the device just to log.
    pending = None
    results = None
    start_time = time.perf_counter()
    # Updates skipped in this session. The sum stays on the device, so counting adds no
    # host synchronisation beyond the metrics fetch.
    skipped_updates = jnp.zeros((), jnp.float32)

    saving = None  # the step of the newest save whose commit is not yet confirmed

    def check_saving(wait: bool) -> None:
        """Raise the error of a failed background save; with `wait`, wait for it first."""
        nonlocal saving
        if saving is None or (not wait and manager.is_saving_in_progress()):
            return
        checkpointing.wait_until_committed(manager, saving)
        saving = None

    def start_save(step: int) -> None:
        nonlocal saving
        check_saving(wait=True)
        checkpointing.save(manager, step, state, batch_index, definition)
        saving = step

    def flush_pending():
        nonlocal pending
        if pending is not None:
            _log_train(writer, progress, *pending, window=window, schedule=schedule)
            if not config.skip_nonfinite_updates:
                check_finite(jax.device_get(pending[1]), pending[0], manager)
            pending = None

    with (
        jax.set_mesh(mesh),
        nn.logical_axis_rules(rules),
        preemption.sigterm_request() as stop_request,
    ):
        for step in range(start_step, config.total_steps):
            check_saving(wait=False)
            batch = next(train_batches)
            state, metrics = step_fn(state, batch)
            batch_index += 1
            if config.skip_nonfinite_updates:
                skipped_updates = skipped_updates + metrics["skipped"]
                metrics = {**metrics, "skipped_updates": skipped_updates}
            flush_pending()
            done = step + 1
            if step == start_step:
                jax.block_until_ready(metrics)
                progress.restart(done)  # the first step includes compilation
            if done % config.log_every == 0 or done == config.total_steps:
                pending = (done, metrics)
            if done % config.eval_every == 0 or done == config.total_steps:
                flush_pending()
                results = run_eval(done)
                progress.restart(done)
            if done % config.checkpoint_every == 0 or done == config.total_steps:
                if not config.skip_nonfinite_updates:
                    # Checked before saving, so that no checkpoint stores parameters
                    # that a NaN or Inf update reached.
                    check_finite(jax.device_get(metrics), done, manager)
                start_save(done)
            # NOTE: each process reads only its own flag, so a multi-process run stops cleanly
            # only if every process receives SIGTERM before the same step ends.
            if stop_request.requested and done < config.total_steps:
                flush_pending()
                if done % config.checkpoint_every:
                    start_save(done)
                checkpointing.wait_until_committed(manager, done)
                manager.close()
                writer.close()
                raise preemption.Preempted(done, workdir)
        flush_pending()

    if results is None:
        writers.log_and_print(
            f"The run had already reached total_steps={config.total_steps}; evaluating."
        )
        results = run_eval(start_step)
    final_step = int(state.step)
    # The final checkpoint must be on disk before summary.json reports the run as done.
    checkpointing.wait_until_committed(manager, final_step)
    manager.close()
    writer.close()

    summary = {
        "step": final_step,
        "tokens_seen": final_step * tokens_per_step,
        "loss": loss_name,
        "window": window,
        "parameters": int(parameter_count),
        "train_seconds_this_session": round(time.perf_counter() - start_time, 1),
        **results,
    }
    unigram = data.unigram_perplexity(config.data, "validation")
    summary["eval/unigram_perplexity"] = unigram
    write_summary(workdir, summary)
    writers.log_and_print(
        "Final evaluation on the validation split:\n" + writers.summary_table(summary, unigram)
    )
    writers.log_and_print(f"Summary written to {os.path.join(workdir, 'summary.json')}")
    return summary


def _log_train(writer, progress, step, metrics, *, window, schedule):
    scalars = train_metrics(jax.device_get(metrics), window)
    scalars["train/learning_rate"] = float(schedule(step - 1))
    writer.write(step, scalars)
    writers.log_and_print(progress.line(step, scalars))
