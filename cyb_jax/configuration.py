"""Config checks: the command line before parsing, and field values before compiling.

`check_command_line` runs before absl parses flags, so that a missing config
file, an unknown `--config.` key or a malformed value fails at once with a
message that names the problem and the fix instead of a traceback.
`validate` checks the meaning of the fields; `validate_for_mesh` checks what
must divide the device mesh.
"""

import ast
import difflib
import importlib.util
import json
import os
import sys
import unicodedata
from typing import Any, Sequence

import jax
import ml_collections

from cyb_jax import attention
from cyb_jax import losses
from cyb_jax import objective

LOSS_NAMES = ("ce", "pause_ce", "ap", "va", "dp")
CYB_LOSSES = ("ap", "va", "dp")
VISIBILITY_MODES = ("visible", "private")
PAUSE_INPUTS = ("code", "token+code")
DISCOUNT_KINDS = ("constant", "linear", "exponential")
# Fields that may be None. The command line cannot pass None, so for these fields the
# value 'none' (any case) means None. Write './none' for a directory of that name.
NULLABLE_FIELDS = ("data.data_dir",)
NONE_LITERAL = "none"
# Fields that contain ratios over the W pause steps, written 'r_0:...:r_{W-1}'. Empty uses the default.
DISTRIBUTION_FIELDS = ("loss.world_stop", "loss.prior")


class ConfigError(ValueError):
    """A config file, override or field value that cannot be used as given."""


# Characters from other scripts that render like ASCII letters in common fonts.
_LOOKALIKES = {
    "а": "a",
    "в": "b",
    "е": "e",
    "к": "k",
    "м": "m",
    "н": "h",
    "о": "o",
    "р": "p",
    "с": "c",
    "т": "t",
    "у": "y",
    "х": "x",
    "ѕ": "s",
    "і": "i",
    "ј": "j",
    "ԁ": "d",
    "А": "A",
    "В": "B",
    "Е": "E",
    "К": "K",
    "М": "M",
    "Н": "H",
    "О": "O",
    "Р": "P",
    "С": "C",
    "Т": "T",
    "Х": "X",
    "α": "a",
    "ο": "o",
    "ρ": "p",
    "ν": "v",
    "ι": "i",
    "Α": "A",
    "Β": "B",
    "Ε": "E",
    "Ο": "O",
    "Ρ": "P",
    "Τ": "T",
    "‐": "-",
    "‑": "-",
    "–": "-",
    "—": "-",
    "−": "-",
    "＿": "_",
    "．": ".",
    "／": "/",
}


def _ascii_lookalike(text: str) -> str:
    """Replace characters that look like ASCII by the ASCII they imitate."""
    replaced = []
    for char in text:
        if char in _LOOKALIKES:
            replaced.append(_LOOKALIKES[char])
        else:
            decomposed = unicodedata.normalize("NFKD", char)
            replaced.append(decomposed if decomposed.isascii() and decomposed else char)
    return "".join(replaced)


def missing_config_message(path: str) -> str:
    """Explain why the config file `path` is not found and what was probably meant."""
    foreign = [(i, c) for i, c in enumerate(path) if not c.isascii()]
    if foreign:
        intended = _ascii_lookalike(path)
        described = ", ".join(
            f"{c!r} (U+{ord(c):04X} {unicodedata.name(c, 'unnamed character')}) at position {i}"
            for i, c in foreign
        )
        if os.path.isfile(intended):
            return (
                f"Config file {path!r} not found. The path contains the non-ASCII character {described}, "
                f"which looks like ASCII; did you mean --config={intended}?"
            )
        return f"Config file {path!r} not found. The path contains the non-ASCII character {described}."
    folder = os.path.dirname(path) or "."
    candidates = sorted(
        name
        for name in (os.listdir(folder) if os.path.isdir(folder) else [])
        if name.endswith(".py") and name != "__init__.py"
    )
    close = difflib.get_close_matches(os.path.basename(path), candidates, n=1, cutoff=0.75)
    hint = f" Did you mean --config={os.path.join(folder, close[0])}?" if close else ""
    listing = (
        f" Config files in {folder}/: {', '.join(candidates)}."
        if candidates
        else (" Run from the repository root, where configs/ holds the config files.")
    )
    return f"Config file {path!r} not found.{hint}{listing}"


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Import a config file and return its `get_config()`."""
    if not os.path.isfile(path):
        raise ConfigError(missing_config_message(path))
    # Config files import their siblings as `configs.base`; make that package importable
    # when the command runs outside the repository root.
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == "configs" and os.path.dirname(folder) not in sys.path:
        sys.path.insert(0, os.path.dirname(folder))
    spec = importlib.util.spec_from_file_location("_cyb_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file {path!r} defines no get_config() function.")
    return module.get_config()


def _parse_override(key: str, text: str, config: ml_collections.ConfigDict) -> Any:
    """Check that `text` parses as the type of field `key`, the way ml_collections will parse it."""
    parent, _, leaf = key.rpartition(".")
    section = config
    for part in parent.split(".") if parent else []:
        section = section[part]
    field_type = section.get_type(leaf)
    if text.lower() == NONE_LITERAL and key not in NULLABLE_FIELDS and field_type is str:
        raise ConfigError(
            f"Invalid value {text!r} for --config.{key}: this field cannot be None. Fields "
            f"that accept None ({', '.join(NULLABLE_FIELDS)}) take the value '{NONE_LITERAL}'; "
            f"an empty string is --config.{key}=''."
        )
    if field_type is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"Invalid value {text!r} for --config.{key}: expected true or false.")
        return None
    if field_type in (int, float):
        try:
            field_type(text)
        except ValueError:
            raise ConfigError(
                f"Invalid value {text!r} for --config.{key}: expected a number of type "
                f"{field_type.__name__} (default {section[leaf]!r})."
            ) from None
        return None
    if field_type in (tuple, list):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"Invalid value {text!r} for --config.{key}: expected a Python literal "
                f"such as {section[leaf]!r}."
            ) from None
        # ml_collections wraps a single value into a one-element tuple, which would
        # silently change the field's meaning.
        if not isinstance(value, (tuple, list)):
            raise ConfigError(
                f"Invalid value {text!r} for --config.{key}: expected a {field_type.__name__} "
                f"such as {section[leaf]!r}, got a single {type(value).__name__}. Write a "
                "one-element tuple as (value,)."
            )
    return None


def _known_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        full = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_known_keys(value, full + "."))
        else:
            keys.append(full)
    return keys


def check_command_line(argv: Sequence[str], flag: str = "config") -> None:
    """Check `--config=PATH` and every `--config.key=value` before absl parses them."""
    config_path, overrides = None, []
    arguments = list(argv)
    for index, argument in enumerate(arguments):
        if argument.startswith(f"--{flag}="):
            config_path = argument.split("=", 1)[1]
        elif argument == f"--{flag}" and index + 1 < len(arguments):
            config_path = arguments[index + 1]
        elif argument.startswith(f"--{flag}."):
            name, has_value, value = argument[len(flag) + 3 :].partition("=")
            overrides.append((name, value if has_value else None))
    if config_path is None:
        raise ConfigError(f"Missing --{flag}=PATH, e.g. --{flag}=configs/ap.py.")
    config = load_config_file(config_path)
    known = _known_keys(config)
    for name, value in overrides:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean --{flag}.{close[0]}?" if close else ""
            raise ConfigError(f"Unknown config field --{flag}.{name} for {config_path}.{hint}")
        if value is not None:
            _parse_override(name, value, config)


def _check_choice(value: Any, choices: Sequence[str], field: str) -> None:
    if value not in choices:
        raise ConfigError(
            f"config.{field}={value!r} is invalid; expected one of {', '.join(choices)}."
        )


def _check_positive(config: ml_collections.ConfigDict, fields: Sequence[str]) -> None:
    for field in fields:
        value = config
        for part in field.split("."):
            value = value[part]
        if not value > 0:
            raise ConfigError(f"config.{field} must be positive, got {value!r}.")


def _field(config: ml_collections.ConfigDict, name: str) -> Any:
    value = config
    for part in name.split("."):
        value = value[part]
    return value


def _apply_none_literals(config: ml_collections.ConfigDict) -> None:
    for name in NULLABLE_FIELDS:
        section_name, _, leaf = name.rpartition(".")
        section = _field(config, section_name) if section_name else config
        value = section[leaf]
        if isinstance(value, str) and value.lower() == NONE_LITERAL:
            section[leaf] = None


def _check_not_none(config: ml_collections.ConfigDict) -> None:
    for name in _known_keys(config):
        if _field(config, name) is None and name not in NULLABLE_FIELDS:
            raise ConfigError(
                f"config.{name} is None, but it needs a value. Only "
                f"{', '.join(NULLABLE_FIELDS)} may be None."
            )


def _check_mesh_rules(config: ml_collections.ConfigDict) -> None:
    """Check that each mesh rule is (logical_name, None | mesh_axis | tuple of mesh axes)."""
    # Imported here because sharding imports Flax, which the flag checks above do not need.
    from cyb_jax import sharding

    rules = config.mesh.rules
    if not isinstance(rules, (tuple, list)):
        raise ConfigError(f"config.mesh.rules must be a tuple of rules, got {rules!r}.")
    for rule in rules:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(
                f"config.mesh.rules entry {rule!r} is invalid; expected (logical_name, mesh_axes), "
                "where mesh_axes is a mesh axis, a tuple of mesh axes or None."
            )
        logical, target = rule
        if target is None:
            continue
        axes = (target,) if isinstance(target, str) else target
        if not isinstance(axes, (tuple, list)) or not all(isinstance(a, str) for a in axes):
            raise ConfigError(
                f"config.mesh.rules maps {logical!r} to {target!r}; expected a mesh axis name, "
                "a tuple of mesh axis names or None."
            )
        for axis in axes:
            if axis in sharding.MESH_AXES:
                continue
            named = [name for name in sharding.MESH_AXES if name in axis]
            hint = (
                f" Several mesh axes are written as a tuple, e.g. {tuple(named)!r}."
                if len(named) > 1 or (named and axis != named[0])
                else ""
            )
            raise ConfigError(
                f"config.mesh.rules maps {logical!r} to {axis!r}, which is not a mesh axis; the "
                f"mesh axes are {', '.join(sharding.MESH_AXES)}.{hint}"
            )


def _check_distributions(config: ml_collections.ConfigDict) -> None:
    window = config.pause.window
    example = ":".join(["1"] * window)
    for name in DISTRIBUTION_FIELDS:
        value = _field(config, name)
        if value in ("", None):
            continue
        try:
            losses.parse_ratios(value, window, name.rpartition(".")[2])
        except ValueError as error:
            raise ConfigError(
                f"config.{name}={value!r} is invalid: {error}. Give one non-negative ratio per "
                f"pause step with a positive total, e.g. --config.{name}={example} for "
                f"pause.window={window}."
            ) from None


def validate(config: ml_collections.ConfigDict) -> None:
    """Check field values and combinations before anything is built or compiled.

    Replaces the value 'none' (any case) of a field in NULLABLE_FIELDS by None,
    because ml_collections cannot parse None from the command line.
    """
    _apply_none_literals(config)
    _check_not_none(config)
    _check_choice(config.loss.name, LOSS_NAMES, "loss.name")
    _check_choice(config.model.pause_visibility, VISIBILITY_MODES, "model.pause_visibility")
    _check_choice(config.pause.input, PAUSE_INPUTS, "pause.input")
    _check_choice(config.model.attention, attention.IMPLEMENTATIONS, "model.attention")
    _check_choice(config.loss.discount_kind, DISCOUNT_KINDS, "loss.discount_kind")
    _check_positive(
        config,
        (
            "total_steps",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "pause.window",
            "data.seq_len",
            "data.batch_size",
            "data.vocab_size",
            "model.num_layers",
            "model.d_model",
            "model.num_heads",
            "model.mlp_dim",
            "model.vocab_multiple",
            "optimizer.learning_rate",
        ),
    )
    window = config.pause.window
    if config.loss.name == "ce" and window != 1:
        raise ConfigError(
            f"config.loss.name='ce' trains without pauses but config.pause.window={window}; "
            "set --config.pause.window=1 or pick a pause loss (pause_ce, ap, va, dp)."
        )
    if config.model.d_model % config.model.num_heads:
        raise ConfigError(
            f"config.model.d_model={config.model.d_model} is not divisible by "
            f"config.model.num_heads={config.model.num_heads}."
        )
    if (config.model.d_model // config.model.num_heads) % 2:
        raise ConfigError("The head dimension d_model / num_heads must be even for RoPE.")
    dk_prior = config.model.dk_prior
    if not 0.0 <= dk_prior < 1.0:
        raise ConfigError(
            f"config.model.dk_prior must lie in [0, 1), with 0 for no DK offset, got {dk_prior!r}."
        )
    if config.loss.step_ce_weight < 0 or config.loss.dk_warmup_steps < 0:
        raise ConfigError(
            "config.loss.step_ce_weight and config.loss.dk_warmup_steps must be >= 0."
        )
    if config.init_from and not os.path.isdir(config.init_from):
        raise ConfigError(f"config.init_from={config.init_from!r} is not a directory.")
    _check_distributions(config)
    _check_mesh_rules(config)
    try:
        objective.make_loss_fn(config)  # the loss factory validates distributions and names
    except ValueError as error:
        window = config.pause.window
        example = ":".join(["1"] * window)
        raise ConfigError(
            f"Invalid loss settings in config.loss: {error}. Distributions take one ratio per "
            f"pause step, e.g. --config.loss.prior={example} for pause.window={window}."
        ) from None


def _logical_dimensions(
    config: ml_collections.ConfigDict, model_config
) -> dict[str, tuple[int, str, str]]:
    """Map each logical axis to (size, config field, how to fix a size that does not divide)."""
    vocab = (
        model_config.padded_vocab_size,
        "model.vocab_multiple",
        "set config.model.vocab_multiple to a multiple of {devices} (the table is padded to it)",
    )
    embed = (model_config.d_model, "model.d_model", "use a multiple of {devices}")
    heads = (model_config.num_heads, "model.num_heads", "use a multiple of {devices}")
    kv = (
        model_config.head_dim,
        "model.d_model / model.num_heads",
        "make the head dimension a multiple of {devices}",
    )
    mlp = (model_config.mlp_dim, "model.mlp_dim", "use a multiple of {devices}")
    # The model runs on the flattened slots: L real tokens times W pause slots.
    length = (
        config.data.seq_len * model_config.window,
        "data.seq_len * pause.window",
        "make the slot count a multiple of {devices}",
    )
    batch = (config.data.batch_size, "data.batch_size", "use a multiple of {devices}")
    return {
        "vocab": vocab,
        "act_vocab": vocab,
        "embed": embed,
        "act_embed": embed,
        "heads": heads,
        "act_heads": heads,
        "kv": kv,
        "act_kv": kv,
        "mlp": mlp,
        "act_mlp": mlp,
        "act_length": length,
        "act_batch": batch,
    }


def _rule_mesh_axes(
    config: ml_collections.ConfigDict, mesh_axes: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """Return the mesh axes of each logical name; the first rule for a name wins, as in Flax."""
    axes_by_name: dict[str, tuple[str, ...]] = {}
    for rule in config.mesh.rules:
        if len(rule) != 2:
            raise ConfigError(
                f"config.mesh.rules entry {rule!r} is invalid; expected (logical_name, mesh_axis), "
                "where mesh_axis is a mesh axis, a tuple of mesh axes or None."
            )
        logical, target = rule
        if target is None:
            targets = ()
        elif isinstance(target, str):
            targets = (target,)
        else:
            targets = tuple(target)
        for axis in targets:
            if axis not in mesh_axes:
                raise ConfigError(
                    f"config.mesh.rules maps {logical!r} to unknown mesh axis {axis!r}; "
                    f"the mesh axes are {', '.join(mesh_axes)}."
                )
        axes_by_name.setdefault(logical, targets)
    return axes_by_name


def validate_for_mesh(
    config: ml_collections.ConfigDict,
    device_count: int,
    model_config,
    process_count: int = 1,
) -> dict[str, int]:
    """Check the mesh against the devices and the shapes against the axes they are sharded over.

    Runs before anything is compiled. The mesh degrees must multiply to
    `device_count`, and every dimension that the rules in `config.mesh.rules`
    shard must divide the product of its mesh axes. Returns the resolved mesh
    shape, e.g. {'data': 2, 'fsdp': 2, 'tensor': 2}.
    """
    # Imported here because sharding imports Flax, which the flag checks above do not need.
    from cyb_jax import sharding

    try:
        shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, device_count)))
    except ValueError as error:
        raise ConfigError(str(error)) from None

    dimensions = _logical_dimensions(config, model_config)
    for logical, mesh_axes in _rule_mesh_axes(config, sharding.MESH_AXES).items():
        if logical not in dimensions or not mesh_axes:
            continue
        size, field, fix = dimensions[logical]
        devices = 1
        for axis in mesh_axes:
            devices *= shape[axis]
        if size % devices:
            axes = " x ".join(mesh_axes)
            raise ConfigError(
                f"config.{field} = {size} does not divide the {devices} devices of mesh axis "
                f"{axes} that config.mesh.rules shard {logical!r} over; {fix.format(devices=devices)}, "
                f"or change config.mesh.{'/'.join(sharding.MESH_AXES)} or the rule for {logical!r}."
            )

    if config.data.batch_size % process_count:
        raise ConfigError(
            f"config.data.batch_size = {config.data.batch_size} does not divide the "
            f"{process_count} processes; each process loads an equal share of every batch, "
            f"so use a multiple of {process_count}."
        )
    return shape


# Fields whose change alters the shapes or the meaning of the parameters in a checkpoint.
CHECKPOINT_FIELDS = (
    "data.vocab_size",
    "model.num_layers",
    "model.d_model",
    "model.num_heads",
    "model.mlp_dim",
    "model.vocab_multiple",
    "model.param_dtype",
    "model.pause_visibility",
    "pause.window",
    "pause.input",
    "loss.name",
)


# Switches that only control how a run resumes, so they are not compared with config.json.
RESUME_SWITCHES = ("allow_config_change", "restore_fallback", "reset_optimizer")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def config_changes(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Compare `config` with the config.json a run saved in `workdir` and list the changes.

    Each entry reads "field: old -> new". Raises ConfigError when a field of
    CHECKPOINT_FIELDS changed, unless config.allow_config_change is set.
    Returns an empty list when the workdir has no config.json.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        saved = _flatten(json.load(handle))
    # The JSON round trip gives both sides the same types, e.g. lists for tuples.
    current = _flatten(json.loads(json.dumps(config.to_dict(), default=str)))
    changed = sorted(
        name
        for name in saved.keys() | current.keys()
        if name not in RESUME_SWITCHES and saved.get(name) != current.get(name)
    )
    changes = [f"{name}: {saved.get(name)!r} -> {current.get(name)!r}" for name in changed]
    breaking = [change for name, change in zip(changed, changes) if name in CHECKPOINT_FIELDS]
    if breaking and not config.allow_config_change:
        raise ConfigError(
            f"The checkpoints in {workdir} were written with a different config, and these "
            f"changes alter what a checkpoint means: {'; '.join(breaking)}. Use a new "
            "--workdir for the new config, or pass --config.allow_config_change=true to "
            "resume anyway."
        )
    return changes


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Write the run's config as JSON into the workdir (process 0 only)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(config.to_dict(), handle, indent=2, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)
