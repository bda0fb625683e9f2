"""Device mesh and logical-axis sharding.

Parameters and activations name logical axes (`vocab`, `embed`, `act_batch`, ...);
the config's `mesh.rules` map those names to the mesh axes ('data', 'fsdp',
'tensor'). The same code therefore runs on one CPU (a 1x1x1 mesh), on fake CPU
devices in tests, and on a pod.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
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
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


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
