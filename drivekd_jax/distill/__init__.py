"""Drive-KD distillation core: signals, losses, AGP and dynamic loss weights.

signals   which maps / hidden states each capability distils, and the `MapRequest`s
losses    CE, text→vision and grouped full-map attention MSE, ablation losses, mixing matrix
agp       Asymmetric Gradient Projection as an optax transformation over stacked gradients
reweight  the official GradNorm-like online loss reweighting
"""

from drivekd_jax.distill.agp import AGPState, agp_diagnostics, asymmetric_gradient_projection
from drivekd_jax.distill.reweight import Reweighter, ReweightState
from drivekd_jax.distill.signals import CapabilitySignal, DistillConfig, map_requests

__all__ = [
  "AGPState",
  "CapabilitySignal",
  "DistillConfig",
  "ReweightState",
  "Reweighter",
  "agp_diagnostics",
  "asymmetric_gradient_projection",
  "map_requests",
]
