"""Drive-KD losses against direct NumPy computations on small arrays."""

import numpy as np
import pytest

from drivekd_jax.distill import losses


def _softmax_rows(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _causal_maps(rng, b, l):
  scores = rng.normal(size=(b, l, l))
  scores = np.where(np.tril(np.ones((l, l), bool)), scores, -np.inf)
  return _softmax_rows(scores).astype(np.float32)


def test_cross_entropy_matches_hf_convention():
  rng = np.random.default_rng(0)
  b, l, v = 2, 7, 11
  logits = rng.normal(size=(b, l, v)).astype(np.float32)
  labels = rng.integers(0, v, size=(b, l))
  labels[:, :3] = -100
  labels[1, 5:] = -100
  attn = np.ones((b, l), bool)
  attn[1, 6] = False  # padding; its label is also -100 above
  got = losses.cross_entropy(logits, labels, attn)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  total, count = 0.0, 0
  for i in range(b):
    for t in range(l - 1):
      if labels[i, t + 1] != -100 and attn[i, t + 1]:
        total -= logp[i, t, labels[i, t + 1]]
        count += 1
  np.testing.assert_allclose(got, total / count, rtol=1e-5)
  # A padding example (example_mask False) does not count.
  got_one = losses.cross_entropy(logits, labels, attn, example_mask=np.array([True, False]))
  np.testing.assert_allclose(got_one, losses.cross_entropy(logits[:1], labels[:1]), rtol=1e-6)
  assert float(losses.cross_entropy(logits, np.full((b, l), -100))) == 0.0


def _np_tv(s, t, image_mask, attn):
  out = []
  for b in range(s.shape[0]):
    m = (~image_mask[b] & attn[b])[:, None] & (image_mask[b] & attn[b])[None, :]
    out.append(((s[b] - t[b]) ** 2 * m).sum() / max(1, m.sum()))
  return np.array(out)


def test_text_to_image_mse_full_and_gathered_maps_agree_with_numpy():
  rng = np.random.default_rng(1)
  b, l = 3, 12
  s, t = _causal_maps(rng, b, l), _causal_maps(rng, b, l)
  image_mask = np.zeros((b, l), bool)
  image_mask[0, 2:6] = True
  image_mask[1, 1:4] = True
  image_mask[1, 7:9] = True
  attn = np.ones((b, l), bool)
  attn[1, 10:] = False  # token padding
  # row 2: no image at all -> loss 0.
  expected = _np_tv(s, t, image_mask, attn)
  full = losses.text_to_image_mse(s, t, losses.text_query_mask(image_mask, attn), image_mask)
  np.testing.assert_allclose(full, expected, rtol=1e-5)
  assert float(full[2]) == 0.0
  # Gathered [B, L, N] blocks, as the decoder returns them (image keys in order, zero-padded).
  n = 6
  pos = np.zeros((b, n), int)
  for i in range(b):
    idx = np.nonzero(image_mask[i])[0]
    pos[i, : len(idx)] = idx
  gs = np.take_along_axis(s, pos[:, None, :].repeat(l, 1), axis=2)
  gt = np.take_along_axis(t, pos[:, None, :].repeat(l, 1), axis=2)
  valid = losses.image_key_valid(image_mask, n)
  gathered = losses.text_to_image_mse(gs, gt, losses.text_query_mask(image_mask, attn), valid)
  np.testing.assert_allclose(gathered, expected, rtol=1e-5)


def test_faithful_on_unpadded_batch_one():
  """Official formula: M = (1 - is_img) ⊗ is_img, denominator counts pre-image text queries."""
  rng = np.random.default_rng(2)
  l = 10
  s, t = _causal_maps(rng, 1, l), _causal_maps(rng, 1, l)
  is_img = np.zeros((1, l), bool)
  is_img[0, 4:7] = True
  m = (~is_img[0])[:, None] & is_img[0][None, :]
  official = ((s[0] - t[0]) ** 2 * m).sum() / max(1.0, m.sum())
  got = losses.text_to_image_mse(s, t, losses.text_query_mask(is_img), is_img)
  np.testing.assert_allclose(got[0], official, rtol=1e-5)
  assert m.sum() == 7 * 3


def test_cosine_variant():
  rng = np.random.default_rng(3)
  s, t = _causal_maps(rng, 2, 8), _causal_maps(rng, 2, 8)
  im = np.zeros((2, 8), bool)
  im[:, 2:5] = True
  q = losses.text_query_mask(im)
  got = losses.text_to_image_cosine(s, t, q, im)
  for b in range(2):
    m = q[b][:, None] & im[b][None, :]
    a, c = (s[b] * m).ravel(), (t[b] * m).ravel()
    np.testing.assert_allclose(got[b], 1 - a @ c / np.linalg.norm(a) / np.linalg.norm(c), rtol=1e-5)
  np.testing.assert_allclose(losses.text_to_image_cosine(s, s, q, im), 0.0, atol=1e-6)


@pytest.mark.parametrize(
  "n_student,n_teacher,start,end",
  [(4, 8, 0, -2), (24, 28, 0, -2), (6, 4, 0, -2), (5, 5, 1, -2), (8, 12, 2, -3)],
)
def test_grouped_windows_follow_official_mapping(n_student, n_teacher, start, end):
  s_idx = losses.resolve_layer_range(start, end, n_student)
  t_idx = losses.resolve_layer_range(start, end, n_teacher)
  windows = losses.grouped_layer_windows(s_idx, t_idx)
  k, m = len(s_idx), len(t_idx)
  g = max(1, m - k + 1)
  for i, (s_layer, t_layers) in enumerate(windows):
    assert s_layer == s_idx[i]
    assert len(t_layers) == g
    lo = min(i, m - g)
    assert t_layers == tuple(t_idx[lo : lo + g])
  if (n_student, n_teacher) == (24, 28):
    assert g == 5 and windows[0][1] == (0, 1, 2, 3, 4) and windows[-1][1] == (22, 23, 24, 25, 26)


@pytest.mark.parametrize("n_student,n_teacher", [(3, 6), (5, 3), (4, 4)])
def test_grouped_full_map_loss_matches_numpy(n_student, n_teacher):
  rng = np.random.default_rng(4)
  b, l = 2, 6
  s_maps = {i: _causal_maps(rng, b, l) for i in range(n_student)}
  t_maps = {i: _causal_maps(rng, b, l) for i in range(n_teacher)}
  s_idx = losses.resolve_layer_range(0, -2, n_student)
  t_idx = losses.resolve_layer_range(0, -2, n_teacher)
  windows = losses.grouped_layer_windows(s_idx, t_idx)
  needed = {t for _, ts in windows for t in ts}
  got = losses.grouped_full_map_loss(s_maps, {t: t_maps[t] for t in needed}, windows)
  # Official: per layer mean over all B*L*L entries of (S - mean T)^2, averaged over layers.
  k, m = len(s_idx), len(t_idx)
  g = max(1, m - k + 1)
  per_layer = []
  for i, s_layer in enumerate(s_idx):
    lo = min(i, m - g)
    target = np.mean([t_maps[t] for t in t_idx[lo : lo + g]], axis=0)
    per_layer.append(((s_maps[s_layer] - target) ** 2).mean(axis=(1, 2)))
  np.testing.assert_allclose(got, np.mean(per_layer, axis=0), rtol=1e-5)
  # Padding: a padded copy of sample 0 gives the same value as the unpadded one.
  pad = 3
  s_pad = {
    i: np.pad(v[:1], ((0, 0), (0, pad), (0, pad)), constant_values=0.3) for i, v in s_maps.items()
  }
  t_pad = {
    i: np.pad(v[:1], ((0, 0), (0, pad), (0, pad)), constant_values=0.9) for i, v in t_maps.items()
  }
  mask = np.concatenate([np.ones((1, l), bool), np.zeros((1, pad), bool)], 1)
  np.testing.assert_allclose(
    losses.grouped_full_map_loss(s_pad, t_pad, windows, token_mask=mask)[0], got[0], rtol=1e-5
  )
  # Cosine ablation: per layer 1 - cos(S, mean T) over the flattened L x L map, averaged.
  cos = losses.grouped_full_map_loss(s_maps, t_maps, windows, metric="cosine")
  per_layer = []
  for i, s_layer in enumerate(s_idx):
    lo = min(i, m - g)
    target = np.mean([t_maps[t] for t in t_idx[lo : lo + g]], axis=0).reshape(b, -1)
    student = s_maps[s_layer].reshape(b, -1)
    dot = np.sum(student * target, -1)
    per_layer.append(1 - dot / np.linalg.norm(student, axis=-1) / np.linalg.norm(target, axis=-1))
  np.testing.assert_allclose(cos, np.mean(per_layer, axis=0), rtol=1e-5)


def test_negative_and_bad_layer_ranges():
  assert losses.resolve_layer_range(-3, -1, 8) == (5, 6, 7)
  with pytest.raises(ValueError, match="out of range"):
    losses.resolve_layer_range(0, 9, 8)
  with pytest.raises(ValueError, match="empty layer range"):
    losses.resolve_layer_range(-1, 2, 8)


def test_logit_kl_and_hidden_mse():
  rng = np.random.default_rng(5)
  b, l, v = 2, 5, 7
  s, t = rng.normal(size=(b, l, v)), rng.normal(size=(b, l, v))
  labels = rng.integers(0, v, size=(b, l))
  labels[:, :2] = -100
  temp = 2.0
  got = losses.logit_kl(s, t, labels, temperature=temp)
  ps, pt = _softmax_rows(s / temp), _softmax_rows(t / temp)
  kl = (pt * (np.log(pt) - np.log(ps))).sum(-1) * temp**2
  mask = labels[:, 1:] != -100
  np.testing.assert_allclose(got, (kl[:, :-1] * mask).sum(-1) / mask.sum(-1), rtol=1e-5)

  hs, ht = rng.normal(size=(b, l, 4)), rng.normal(size=(b, l, 6))
  proj = rng.normal(size=(4, 6))
  tok = np.ones((b, l), bool)
  tok[1, 3:] = False
  got = losses.hidden_mse(hs, ht, tok, proj)
  per_tok = ((hs @ proj - ht) ** 2).mean(-1)
  np.testing.assert_allclose(got, (per_tok * tok).sum(-1) / tok.sum(-1), rtol=1e-5)
  with pytest.raises(ValueError, match="projection"):
    losses.hidden_mse(hs, ht)


def test_mixing_matrix_and_batch_mean():
  mix = np.asarray(losses.mixing_matrix())
  np.testing.assert_allclose(mix[:3], losses.OFFICIAL_MIXING, rtol=1e-6)
  np.testing.assert_allclose(mix[3], 0.0)
  mix2 = np.asarray(losses.mixing_matrix(((2, 1, 1), (0, 0, 0), (1, -1, 1))))
  np.testing.assert_allclose(mix2[0], [0.5, 0.25, 0.25])
  np.testing.assert_allclose(mix2[1], 0.0)
  np.testing.assert_allclose(mix2[2], [0.5, 0.0, 0.5])
  x = np.array([1.0, 2.0, 100.0])
  got = losses.masked_batch_mean(x, np.array([0.5, 1.0, 1.0]), np.array([True, True, False]))
  np.testing.assert_allclose(got, (0.5 + 2.0) / 2)
