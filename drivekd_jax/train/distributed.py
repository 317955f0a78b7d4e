"""Multi-process start-up: `jax.distributed.initialize` from the config or the cluster.

Config keys (all optional, top level):
  jax_distributed: True to call `initialize` (launch.py calls it before the task runs).
  coordinator_address: "host:port" of process 0; with num_processes and process_id this is
    the explicit mode for clusters JAX does not detect.
  num_processes, process_id: this run's process count and index.
  local_device_ids: devices this process owns (e.g. one GPU per process), a list of ints.
  cluster_detection_method: force one of JAX's detectors (e.g. "slurm", "mpi4py").
  initialization_timeout: seconds to wait for the other processes (0: JAX's default, 300).

Without an explicit coordinator, JAX detects TPU pods (the TPU metadata server), SLURM
(`SLURM_JOB_ID` with `srun`), Open MPI and Kubernetes jobs and fills everything in itself.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from absl import logging

_CLUSTER_ENV = {
  "SLURM_JOB_ID": "SLURM",
  "OMPI_COMM_WORLD_SIZE": "Open MPI",
  "TPU_WORKER_HOSTNAMES": "TPU pod",
  "MEGASCALE_COORDINATOR_ADDRESS": "TPU multislice",
  "JOBSET_NAME": "Kubernetes JobSet",
}


def detected_cluster() -> str | None:
  """Names the cluster environment JAX will auto-detect, if any."""
  for variable, name in _CLUSTER_ENV.items():
    if os.environ.get(variable):
      return name
  return None


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """The multi-process keys of a config (top level; see the module docstring)."""

  jax_distributed: bool = False
  coordinator_address: str = ""
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple = ()
  cluster_detection_method: str = ""
  initialization_timeout: int = 0  # 0: JAX's own default

  @classmethod
  def from_config(cls, config: Any) -> DistributedSettings:
    """Reads these keys from any config (other keys are ignored; missing ones default)."""
    values = {}
    for field in dataclasses.fields(cls):
      value = config.get(field.name, None) if hasattr(config, "get") else None
      if value is not None:
        values[field.name] = tuple(value) if field.name == "local_device_ids" else value
    return cls(**values)


def initialize_kwargs(config: Any) -> dict[str, Any]:
  """The keyword arguments for `jax.distributed.initialize` taken from the config."""
  settings = DistributedSettings.from_config(config)
  kwargs: dict[str, Any] = {}
  if settings.coordinator_address:
    kwargs["coordinator_address"] = str(settings.coordinator_address)
    for key in ("num_processes", "process_id"):
      value = getattr(settings, key)
      if value is None:
        raise ValueError(f"config.coordinator_address is set, so config.{key} is required")
      kwargs[key] = int(value)
  elif settings.num_processes is not None or settings.process_id is not None:
    raise ValueError("config.num_processes/process_id need config.coordinator_address")
  if settings.local_device_ids:
    kwargs["local_device_ids"] = [int(d) for d in settings.local_device_ids]
  if settings.cluster_detection_method:
    kwargs["cluster_detection_method"] = str(settings.cluster_detection_method)
  if settings.initialization_timeout:
    kwargs["initialization_timeout"] = int(settings.initialization_timeout)
  return kwargs


def initialize(config: Any) -> None:
  """Starts the distributed runtime (explicit flags if given, else cluster auto-detection)."""
  if jax.distributed.is_initialized():
    return
  kwargs = initialize_kwargs(config)
  if "coordinator_address" not in kwargs:
    cluster = detected_cluster()
    if cluster is None:
      # TPU VMs are found through their metadata server, which no variable announces.
      logging.warning(
        "jax.distributed: no cluster variables seen; relying on JAX's own "
        "detection (set config.coordinator_address/num_processes/process_id "
        "for an explicit start)"
      )
    else:
      logging.info("jax.distributed: auto-detecting the %s environment", cluster)
  jax.distributed.initialize(**kwargs)
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
