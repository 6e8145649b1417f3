"""Device mesh and the one rules table that maps logical axis names onto it.

Mesh axes:
  data    pure data parallelism: batch split, parameters replicated
  fsdp    fully sharded data parallelism: batch split, parameters and optimizer state split on
          their `embed` axis and gathered per layer by XLA when used
  tensor  Megatron tensor parallelism: attention heads, FFN hidden units and the vocabulary
          split (column-parallel in, row-parallel out); activations stay whole per device

A mesh size of -1 takes the devices the other axes leave.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer.errors import ConfigError
from transformer.model.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis. Parameters and activations have separate names: a kernel
# [embed, heads, kv] is split along embed over fsdp (FSDP) and along heads over tensor (TP),
# while an activation [activation_batch, activation_length, activation_embed] is split along its
# batch over data x fsdp and kept whole along d_model.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # grouped-query attention: kv head j serves query heads j*n/k...
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("layers", None),
    ("lora", None),  # the rank of LoRA adapters: small, whole on every device
    # Activations: heads and FFN hidden units split as their kernels are (Megatron TP).
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves one -1 entry to the remaining devices and checks the product."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    bad = [name for name, size in sizes.items() if size == 0 or size < -1]
    if bad or len(free) > 1:
        raise ConfigError(
            f"mesh sizes must be positive, with at most one -1 (got data={data}, fsdp={fsdp}, "
            f"tensor={tensor}); set e.g. --config.mesh.data=-1"
        )
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh fsdp*tensor*...={fixed} does not divide the {num_devices} devices; "
                "choose mesh sizes whose product divides the device count"
            )
        sizes[free[0]] = num_devices // fixed
    if int(np.prod(list(sizes.values()))) != num_devices:
        raise ConfigError(
            f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} "
            f"needs {int(np.prod(list(sizes.values())))} devices but {num_devices} exist; "
            "make the product equal the device count or set one axis to -1"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    try:  # lays the axes out along the physical interconnect where JAX knows it (TPU, GPU)
        device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - any topology it cannot handle gets the plain order
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def check_model_fits(cfg: ModelConfig, mesh: Mesh) -> None:
    """Every sharded dimension must divide by its mesh axis; name the fix otherwise."""
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    checks = [
        ("num_heads", cfg.num_heads, tensor, "tensor"),
        ("num_kv_heads", cfg.kv_heads, tensor, "tensor"),
        ("d_ff", cfg.d_ff, tensor, "tensor"),
        ("vocab_size", cfg.vocab_size, tensor, "tensor"),
        ("d_model", cfg.d_model, fsdp, "fsdp"),
    ]
    for field, size, axis_size, axis in checks:
        if size % axis_size:
            raise ConfigError(
                f"model.{field}={size} is not divisible by mesh.{axis}={axis_size}; "
                f"choose mesh.{axis} dividing {size} (or change model.{field})"
            )


def logical_to_sharding(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree whose leaves are `nn.LogicallyPartitioned` (others replicate)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split their leading axis over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def check_batch_fits(batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    """Every micro-batch must split evenly over the data-parallel devices."""
    micro, devices = batch_size // grad_accum_steps, data_parallel_size(mesh)
    if micro % devices:
        raise ConfigError(
            f"the micro-batch of {micro} sequences does not split over mesh data x fsdp = "
            f"{devices} devices; make train.batch_size a multiple of {devices * grad_accum_steps}"
        )
