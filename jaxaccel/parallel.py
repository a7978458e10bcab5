"""Devices, meshes and parallelism strategies: the one place that decides where arrays live.

Strategies:
  * `data`: `jax.jit` over a 1-D `Mesh` named `data`; the batch is sharded on `data`,
    params and optimizer state are replicated.
  * `fsdp`: like `data`, but every state leaf with a dimension divisible by the number of
    devices is sharded on that dimension (the largest such dimension), so each device holds
    1/N of the params and optimizer state; XLA inserts the all-gathers.
  * `pmap`: classic `jax.pmap` with `lax.pmean` over the `data` axis name; state carries a
    leading device axis (see `replicate` / `unreplicate`).
All meshes use `AxisType.Auto` so the same jitted step works for every strategy.

Owns `make_mesh`, `state_shardings`, `shard_batch`, `replicate` / `unreplicate`,
`set_cpu_devices`, `initialize_distributed` and `worker_record` (where this process runs).
Imports nothing of jaxaccel; every layer above
may use it.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
STRATEGIES = ("data", "fsdp", "pmap")
RAY_NODE_ENV = "JAXACCEL_RAY_NODE_ID"  # set by a sweep's Ray task for the run it starts

log = logging.getLogger(__name__)


def set_cpu_devices(n: int) -> None:
    """Simulate `n` CPU devices. Must run before anything starts JAX's backend."""
    if n and n > 0:
        try:
            jax.config.update("jax_num_cpu_devices", int(n))
        except RuntimeError as e:  # backend already started: only fine if it already matches
            if jax.device_count() != n:
                raise ValueError(f"cpu_devices={n}: JAX already started with "
                                 f"{jax.device_count()} devices ({e})") from None


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> bool:
    """Join a multi-process job if one is described; returns True if it did.

    Arguments win over the standard environment variables `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`. On TPU VMs `JAXACCEL_DISTRIBUTED=auto` lets JAX
    detect everything itself.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    count = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    if os.environ.get("JAXACCEL_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return True
    if not address:
        return False
    if count <= 0 or pid < 0:
        raise ValueError(f"distributed run at {address!r} needs num_processes and process_id "
                         f"(got {count}, {pid})")
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # A dead or hung process is detected by the others after the heartbeat timeout (JAX's
    # default 100 s); a process that never starts, after the initialization timeout (300 s).
    timeouts = {}
    for env, arg in (("JAXACCEL_HEARTBEAT_TIMEOUT", "heartbeat_timeout_seconds"),
                     ("JAXACCEL_INIT_TIMEOUT", "initialization_timeout")):
        if os.environ.get(env):
            timeouts[arg] = int(os.environ[env])
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=pid, **timeouts)
    return True


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D `data` mesh over all (or the first `num_devices`) devices, Auto axis types."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`."""
    return NamedSharding(mesh, P(AXIS))


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Shard the largest dimension divisible by `n` (ties: the later one); else replicate."""
    best = None
    for axis, size in enumerate(shape):
        if size % n == 0 and size >= n and (best is None or size >= shape[best]):
            best = axis
    if best is None or n == 1:
        return P()
    spec = [None] * len(shape)
    spec[best] = AXIS
    return P(*spec)


def state_shardings(tree: Any, mesh: Mesh, strategy: str) -> Any:
    """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
    if strategy not in ("data", "fsdp"):
        raise ValueError(f"strategy={strategy!r} has no jit shardings; choose data or fsdp")
    n = mesh.devices.size
    if strategy == "data":
        return jax.tree.map(lambda _: replicated(mesh), tree)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), n)), tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's rows of the global batch -> global arrays sharded on `data`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def split_for_pmap(batch: dict, n: int | None = None) -> dict:
    """(B, ...) local rows -> (n, B / n, ...) for `jax.pmap` over n local devices."""
    n = n or jax.local_device_count()
    return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def replicate(tree: Any, devices: list | None = None) -> Any:
    """Put a copy of every leaf on each (local) device, stacked on a new leading axis."""
    devices = devices or jax.local_devices()
    n = len(devices)

    sharding = NamedSharding(Mesh(np.array(devices), (AXIS,)), P(AXIS))

    def put(x):
        return jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a pmap-replicated tree."""
    return jax.tree.map(lambda x: x[0], tree)


def worker_record() -> dict[str, Any]:
    """Where this process runs (results.json's `worker`): host, pid and the Ray node id of
    the sweep task that started it (None outside Ray)."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "ray_node_id": os.environ.get(RAY_NODE_ENV) or None}
