"""Test setup: eight fake CPU devices, set before jax initialises its backends."""

import os

_FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
# pytest-xdist workers inherit the controller's environment, so the flag may already be there.
if _FAKE_DEVICES not in os.environ.get("XLA_FLAGS", "").split():
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAKE_DEVICES}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after XLA_FLAGS, which jax reads on import)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def fast_compiles():
  """For modules of tiny shapes, where compile time dominates: XLA's optimisations do not change
  fp32 results. Use with `pytestmark = pytest.mark.usefixtures("fast_compiles")`."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
