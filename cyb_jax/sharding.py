"""Device mesh and logical-axis sharding.

Parameters and activations name logical axes (`vocab`, `embed`, `act_batch`, ...);
the config's `mesh.rules` map those names to the mesh axes ('data', 'fsdp',
'tensor'). The same code therefore runs on one CPU (a 1x1x1 mesh), on fake CPU
devices in tests, and on a pod.
"""

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config: ml_collections.ConfigDict, device_count: int) -> tuple[int, ...]:
    """Resolve the configured axis degrees, where -1 takes the devices left over."""
    degrees = [int(mesh_config[axis]) for axis in MESH_AXES]
    free = [axis for axis, degree in zip(MESH_AXES, degrees) if degree == -1]
    if len(free) > 1:
        raise ValueError(
            f"At most one mesh axis may be -1, got {free}. Set all but one of "
            "config.mesh.data/fsdp/tensor to explicit degrees."
        )
    for axis, degree in zip(MESH_AXES, degrees):
        if degree == 0 or degree < -1:
            raise ValueError(f"config.mesh.{axis} must be a positive degree or -1, got {degree}.")
    fixed = math.prod(degree for degree in degrees if degree != -1)
    if free:
        if device_count % fixed:
            raise ValueError(
                f"The fixed mesh degrees multiply to {fixed}, which does not divide the "
                f"{device_count} available devices; change config.mesh.{'/'.join(MESH_AXES)}."
            )
        degrees[MESH_AXES.index(free[0])] = device_count // fixed
    if math.prod(degrees) != device_count:
        raise ValueError(
            f"The mesh {dict(zip(MESH_AXES, degrees))} needs {math.prod(degrees)} devices but "
            f"{device_count} are available; set one axis of config.mesh to -1 or change the degrees."
        )
    return tuple(degrees)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """Build the ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all hosts).

    On TPU the device order follows the physical interconnect
    (`mesh_utils.create_device_mesh`); elsewhere it is the order of `devices`,
    which groups each host's devices together along the outer axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES)


def logical_rules(mesh_config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """Return the rules as hashable tuples, with axis groups given as lists turned into tuples."""
    rules = []
    for logical, mesh_axis in mesh_config.rules:
        if isinstance(mesh_axis, list):
            mesh_axis = tuple(mesh_axis)
        rules.append((logical, mesh_axis))
    return tuple(rules)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """Map a tree that carries logical partitioning metadata to NamedShardings."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a [B, L] input batch: rows over the batch axes, length replicated."""
    spec = nn.logical_to_mesh_axes(("act_batch", None), rules)
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# A weight at least this large that the rules shard but that ended up replicated
# fails the run: on a pod it would cost every device a full copy.
LARGE_WEIGHT_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class ParameterReport:
    """Counts of a sharded parameter tree, for the start-up log."""

    count: int
    bytes: int
    replicated_bytes: int

    def describe(self) -> str:
        return (
            f"{self.count:,} parameters, {self.bytes / 2**20:.2f} MiB, of which "
            f"{self.replicated_bytes / 2**20:.2f} MiB replicated on every device"
        )


def _spans_devices(spec: PartitionSpec, mesh: Mesh) -> bool:
    """Whether `spec` shards some dimension over a mesh axis of size > 1."""
    for entry in spec:
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        if any(mesh.shape[axis] > 1 for axis in axes):
            return True
    return False


def check_parameter_sharding(
    params: Any, expected: Any, min_bytes: int = LARGE_WEIGHT_BYTES
) -> ParameterReport:
    """Count parameters and replicated bytes; raise if a large weight lost its sharding.

    `expected` holds the NamedShardings that the rules give each parameter. A
    parameter of at least `min_bytes` bytes whose expected sharding splits it
    over more than one device but whose array is fully replicated raises a
    ValueError that names it.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    expected_leaves = jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(leaves) != len(expected_leaves):
        raise ValueError(
            f"The parameter tree has {len(leaves)} leaves but the expected shardings have "
            f"{len(expected_leaves)}; build both from the same model."
        )
    count = total_bytes = replicated_bytes = 0
    lost = []
    for (path, array), target in zip(leaves, expected_leaves):
        size = int(np.prod(array.shape))
        nbytes = size * np.dtype(array.dtype).itemsize
        count += size
        total_bytes += nbytes
        if not array.sharding.is_fully_replicated:
            continue
        replicated_bytes += nbytes
        if nbytes >= min_bytes and _spans_devices(target.spec, target.mesh):
            lost.append(f"{jax.tree_util.keystr(path)} {tuple(array.shape)} ({nbytes / 2**20:.1f} MiB, rules say {target.spec})")
    if lost:
        raise ValueError(
            "These weights are replicated on every device although config.mesh.rules shard them: "
            + "; ".join(lost)
            + ". Check that the state was built or restored with the rule-derived shardings."
        )
    return ParameterReport(count=count, bytes=total_bytes, replicated_bytes=replicated_bytes)
