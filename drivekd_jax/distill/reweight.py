"""The official GradNorm-like online loss reweighting (`docs/drivekd_method.md` §3.3), as pure JAX.

Losses are indexed like the loss vector: 0 = hard label (CE), 1..K = active capabilities.
Weights are w = clamp(softplus(a) + eps, min, max), w_ce additionally ≥ min_ce; `a` starts at
softplus⁻¹(static weight). Every micro-step adds, for each loss present in that micro-step, its
raw loss value L_k and the global norm n_k of its un-weighted gradient scaled by 1/accum; after
each optimizer update (every `accum` micro-steps) the window means give

  G_k = w_k n_k,  p_k = static_k / Σ static,  r_k = L_k / L_k(first update),
  T_k = p_k Σ_j G_j (r_k / r̄)^α   (T_k NOT detached, as in the official code),
  obj = Σ_k |G_k − T_k|,

one AdamW step on `a` (lr 3e-4, betas (0.9, 0.99), wd 0, eps 1e-8; per-entry step counts, and
losses absent from the window are left untouched, like a PyTorch parameter whose grad is None),
then the weights are rescaled to Σ w = Σ static, clamped, w_ce ≥ min_ce again, and written back
to `a`. No update happens when fewer than two losses are available or Σ G ≤ 0 (the first-loss
values are still recorded). The window mean divides by the number of micro-steps in the window,
also for a loss absent from some of them (official quirk).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ReweightState(NamedTuple):
  """Dynamic loss-weight state (all `[1+K]` unless noted).

  Attributes:
    logits: the unconstrained parameters a.
    mu, nu: AdamW moments of a; steps: int32 per-entry AdamW step counts.
    loss_init: L_k at the first update that saw loss k; has_init: bool.
    loss_sum, norm_sum: window sums; present: bool, seen in this window; count: int32 micro-steps.
  """

  logits: jax.Array
  mu: jax.Array
  nu: jax.Array
  steps: jax.Array
  loss_init: jax.Array
  has_init: jax.Array
  loss_sum: jax.Array
  norm_sum: jax.Array
  present: jax.Array
  count: jax.Array


@dataclasses.dataclass(frozen=True)
class Reweighter:
  """Static hyper-parameters; `static` are the static weights [w_ce, w_k for active k]."""

  static: tuple[float, ...]
  enabled: bool = True
  lr: float = 3e-4
  alpha: float = 0.0
  eps: float = 1e-8
  w_min: float = 1e-6
  w_max: float = 1e6
  min_ce: float = 0.6
  b1: float = 0.9
  b2: float = 0.99
  adam_eps: float = 1e-8

  @property
  def dynamic(self) -> bool:
    """Official: dynamic only when enabled and at least two losses are active."""
    return self.enabled and len(self.static) >= 2

  def init(self) -> ReweightState:
    n = len(self.static)
    w0 = jnp.clip(jnp.asarray(self.static, jnp.float32), self.w_min, self.w_max)
    zeros = jnp.zeros((n,), jnp.float32)
    return ReweightState(
      logits=softplus_inverse(w0),
      mu=zeros,
      nu=zeros,
      steps=jnp.zeros((n,), jnp.int32),
      loss_init=zeros,
      has_init=jnp.zeros((n,), bool),
      loss_sum=zeros,
      norm_sum=zeros,
      present=jnp.zeros((n,), bool),
      count=jnp.zeros((), jnp.int32),
    )

  def _clamped(self, w):
    w = jnp.clip(w, self.w_min, self.w_max)
    return w.at[0].set(jnp.maximum(w[0], self.min_ce))

  def weights_from_logits(self, logits):
    """w = clamp(softplus(a) + eps), w_ce ≥ min_ce."""
    return self._clamped(jax.nn.softplus(logits) + self.eps)

  def weights(self, state: ReweightState) -> jax.Array:
    """The weights to use now, `[1+K]` (the static weights when not dynamic)."""
    if not self.dynamic:
      return jnp.asarray(self.static, jnp.float32)
    return self.weights_from_logits(state.logits)

  def accumulate(self, state: ReweightState, losses, norms, present) -> ReweightState:
    """Adds one micro-step: raw losses `[1+K]`, scaled gradient norms `[1+K]`, present bool."""
    p = present.astype(jnp.float32)
    return state._replace(
      loss_sum=state.loss_sum + p * losses,
      norm_sum=state.norm_sum + p * norms,
      present=state.present | present,
      count=state.count + 1,
    )

  def update(self, state: ReweightState) -> ReweightState:
    """The end-of-window update (call after an optimizer update); resets the window."""
    reset = state._replace(
      loss_sum=jnp.zeros_like(state.loss_sum),
      norm_sum=jnp.zeros_like(state.norm_sum),
      present=jnp.zeros_like(state.present),
      count=jnp.zeros_like(state.count),
    )
    if not self.dynamic:
      return reset
    c = jnp.maximum(state.count, 1).astype(jnp.float32)
    mean_loss, mean_norm = state.loss_sum / c, state.norm_sum / c
    avail = state.present & (state.count > 0)
    availf = avail.astype(jnp.float32)
    loss_init = jnp.where(avail & ~state.has_init, mean_loss, state.loss_init)
    has_init = state.has_init | avail
    static = jnp.maximum(jnp.asarray(self.static, jnp.float32), 0.0)
    ratio_total = jnp.sum(static * availf)
    ratios = jnp.where(
      ratio_total > 0,
      static * availf / jnp.where(ratio_total > 0, ratio_total, 1.0),
      availf / jnp.maximum(jnp.sum(availf), 1.0),
    )
    r = mean_loss / jnp.maximum(1e-12, loss_init)
    r_bar = jnp.sum(r * availf) / jnp.maximum(jnp.sum(availf), 1.0)

    def objective(logits):
      g = self.weights_from_logits(logits) * mean_norm
      g_sum = jnp.sum(g * availf)
      target = ratios * g_sum
      if self.alpha != 0.0:
        target = target * jnp.power(r / r_bar, self.alpha)
      return jnp.sum(jnp.abs(g - target) * availf), g_sum

    (_, g_sum), grad = jax.value_and_grad(objective, has_aux=True)(state.logits)
    do = (jnp.sum(availf) >= 2) & (g_sum > 0)
    # AdamW (torch semantics, wd 0), only on the available entries.
    step_on = do & avail
    steps = state.steps + step_on.astype(jnp.int32)
    mu = self.b1 * state.mu + (1 - self.b1) * grad
    nu = self.b2 * state.nu + (1 - self.b2) * jnp.square(grad)
    t = jnp.maximum(steps, 1).astype(jnp.float32)
    mu_hat = mu / (1 - self.b1**t)
    nu_hat = nu / (1 - self.b2**t)
    stepped = state.logits - self.lr * mu_hat / (jnp.sqrt(nu_hat) + self.adam_eps)
    logits = jnp.where(step_on, stepped, state.logits)
    # Rescale to the static sum over the available losses, clamp, w_ce floor, write back.
    w_new = self.weights_from_logits(logits)
    subset = jnp.maximum(jnp.sum(w_new * availf), 1e-20)
    target_sum = jnp.where(ratio_total > 0, ratio_total, jnp.sum(availf))
    w_new = self._clamped(jnp.clip(w_new * (target_sum / subset), self.w_min, self.w_max))
    logits = jnp.where(step_on, softplus_inverse(w_new), state.logits)
    return reset._replace(
      logits=logits,
      mu=jnp.where(step_on, mu, state.mu),
      nu=jnp.where(step_on, nu, state.nu),
      steps=steps,
      loss_init=loss_init,
      has_init=has_init,
    )


def softplus_inverse(y):
  """log(expm1(y)) with the official clamp at 1e-20."""
  return jnp.log(jnp.maximum(jnp.expm1(y), 1e-20))
