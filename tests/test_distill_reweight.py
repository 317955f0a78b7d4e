"""Dynamic loss reweighting against a PyTorch implementation written from the spec.

The spec: docs/drivekd_method.md §3.3.
"""

import numpy as np
import torch

from drivekd_jax.distill.reweight import Reweighter


class TorchReweight:
  """Loop-based reference: dict of losses, torch.optim.AdamW on the softplus parameters."""

  def __init__(self, static, lr=3e-4, alpha=0.0):
    self.static = list(static)
    self.alpha = alpha
    self.params = [
      torch.nn.Parameter(torch.log(torch.expm1(torch.tensor(float(w))).clamp_min(1e-20)))
      for w in static
    ]
    self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    self.init = {}

  def weights(self):
    out = []
    for i, a in enumerate(self.params):
      w = torch.clamp(torch.nn.functional.softplus(a) + 1e-8, 1e-6, 1e6)
      if i == 0:
        w = torch.clamp(w, min=0.6)
      out.append(w)
    return out

  def update(self, losses, norms, avail):
    for i in avail:
      self.init.setdefault(i, float(losses[i]))
    w = self.weights()
    g = {i: w[i] * norms[i] for i in avail}
    g_sum = torch.stack([g[i] for i in avail]).sum()
    if g_sum.item() <= 0 or len(avail) < 2:
      return
    ratios = [max(0.0, self.static[i]) for i in avail]
    s = sum(ratios)
    ratios = [r / s for r in ratios]
    r = [torch.tensor(losses[i] / max(1e-12, self.init[i])) for i in avail]
    r_bar = torch.stack(r).mean()
    obj = 0.0
    for p_i, r_i, i in zip(ratios, r, avail):
      target = p_i * g_sum * (r_i / r_bar) ** self.alpha
      obj = obj + (g[i] - target).abs()
    for p in self.params:
      p.grad = None
    obj.backward()
    self.opt.step()
    with torch.no_grad():
      w_new = self.weights()
      subset = torch.stack([w_new[i] for i in avail]).sum().clamp_min(1e-20)
      scale = sum(max(0.0, self.static[i]) for i in avail) / subset.item()
      for i in avail:
        v = torch.clamp(w_new[i] * scale, 1e-6, 1e6)
        if i == 0:
          v = torch.clamp(v, min=0.6)
        self.params[i].data.copy_(torch.log(torch.expm1(v).clamp_min(1e-20)))


def test_matches_torch_reference_over_windows():
  static = (1.0, 0.5, 1.0, 2.0)
  rng = np.random.default_rng(0)
  for alpha in (0.0, 0.7):
    ours = Reweighter(static=static, alpha=alpha, lr=0.05)
    ref = TorchReweight(static, lr=0.05, alpha=alpha)
    state = ours.init()
    for window in range(6):
      present_steps = []
      for _ in range(4):
        losses = rng.uniform(0.1, 3.0, size=4).astype(np.float32)
        norms = rng.uniform(0.01, 5.0, size=4).astype(np.float32)
        present = np.array([True, True, window != 2, True])
        present_steps.append((losses, norms, present))
        state = ours.accumulate(state, losses, norms, present)
      # Reference window means: sums of present values divided by the micro-step count.
      mean_l = sum(l * p for l, _, p in present_steps) / 4
      mean_n = sum(n * p for _, n, p in present_steps) / 4
      avail = [i for i in range(4) if any(p[i] for _, _, p in present_steps)]
      ref.update(mean_l, mean_n, avail)
      state = ours.update(state)
      got = np.asarray(ours.weights(state))
      want = np.array([float(w.detach()) for w in ref.weights()])
      np.testing.assert_allclose(got, want, rtol=2e-4, err_msg=f"alpha {alpha} window {window}")
      assert int(state.count) == 0
    # The weights moved and kept the static sum.
    assert not np.allclose(got, static)
    np.testing.assert_allclose(got.sum(), sum(static), rtol=1e-3)


def test_ce_floor_and_static_mode():
  rw = Reweighter(static=(0.1, 1.0))
  np.testing.assert_allclose(rw.weights(rw.init()), [0.6, 1.0], rtol=1e-5)
  static = Reweighter(static=(1.0, 1.0), enabled=False)
  state = static.accumulate(static.init(), np.ones(2), np.ones(2), np.ones(2, bool))
  state = static.update(state)
  np.testing.assert_allclose(static.weights(state), [1.0, 1.0])
  single = Reweighter(static=(1.0,))
  assert not single.dynamic
