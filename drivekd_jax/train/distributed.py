"""Multi-process start-up: `jax.distributed.initialize` from the config or the cluster.

Config keys (all optional, top level):
  jax_distributed: True to call `initialize` (launch.py calls it before the task runs).
  coordinator_address: "host:port" of process 0; with num_processes and process_id this is
    the explicit mode for clusters JAX does not detect.
  num_processes, process_id: this run's process count and index.
  local_device_ids: devices this process owns (e.g. one GPU per process), a list of ints.
  cluster_detection_method: force one of JAX's detectors (e.g. "slurm", "mpi4py").
  initialization_timeout: seconds to wait for the other processes (default 300).

Without an explicit coordinator, JAX detects TPU pods (the TPU metadata server), SLURM
(`SLURM_JOB_ID` with `srun`), Open MPI and Kubernetes jobs and fills everything in itself.
"""

from __future__ import annotations

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


def initialize_kwargs(config: Any) -> dict[str, Any]:
  """The keyword arguments for `jax.distributed.initialize` taken from the config."""
  get = config.get
  kwargs: dict[str, Any] = {}
  address = get("coordinator_address", None)
  if address:
    kwargs["coordinator_address"] = str(address)
    for key in ("num_processes", "process_id"):
      value = get(key, None)
      if value is None:
        raise ValueError(f"config.coordinator_address is set, so config.{key} is required")
      kwargs[key] = int(value)
  elif get("num_processes", None) is not None or get("process_id", None) is not None:
    raise ValueError("config.num_processes/process_id need config.coordinator_address")
  devices = get("local_device_ids", None)
  if devices is not None:
    kwargs["local_device_ids"] = [int(d) for d in devices]
  method = get("cluster_detection_method", None)
  if method:
    kwargs["cluster_detection_method"] = str(method)
  timeout = get("initialization_timeout", None)
  if timeout is not None:
    kwargs["initialization_timeout"] = int(timeout)
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
