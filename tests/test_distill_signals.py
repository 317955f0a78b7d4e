"""From the distillation config to the maps each model must materialise."""

import pytest

from drivekd_jax.distill import signals
from drivekd_jax.models.config import MapRequest


def test_official_requests_hold_only_what_the_losses_read():
  config = signals.DistillConfig()
  student, (teacher,) = signals.map_requests(config, 4, (8,))
  # Perception layer 0 and planning layer -2 (text->image), reasoning 0..-2 (full).
  assert student == MapRequest(full_layers=(0, 1, 2), text_to_image_layers=(0, 2))
  assert teacher == MapRequest(full_layers=tuple(range(7)), text_to_image_layers=(0, 6))
  resolved = {r.capability: r for r in signals.resolve_signals(config, 4, (8,))}
  # k = 3 student layers, m = 7 teacher layers -> windows of g = 5.
  assert resolved["reasoning"].windows == (
    (0, (0, 1, 2, 3, 4)),
    (1, (1, 2, 3, 4, 5)),
    (2, (2, 3, 4, 5, 6)),
  )
  assert resolved["planning"].windows == ((2, (6,)),)


def test_per_capability_teachers_and_ablation_signals():
  config = signals.DistillConfig.from_config(
    {
      "teacher_for": [0, 1, 2],
      "signals": {
        "perception": {"kind": "hidden", "start": -1},
        "reasoning": {
          "kind": "attention",
          "map": "text_to_image",
          "start": 1,
          "end": -3,
          "metric": "cosine",
        },
        "planning": {"kind": "logit_kl", "temperature": 2.0},
      },
    }
  )
  student, teachers = signals.map_requests(config, 6, (6, 10, 4))
  assert student == MapRequest(text_to_image_layers=(1, 2, 3), hidden_layers=(5,))
  assert teachers[0] == MapRequest(hidden_layers=(5,))
  assert teachers[1] == MapRequest(text_to_image_layers=tuple(range(1, 8)))
  assert teachers[2].empty
  assert signals.needs_teacher_logits(config) == (False, False, True)


def test_zero_weight_disables_a_capability_and_bad_configs_raise():
  config = signals.DistillConfig(weights=(1.0, 0.0, 1.0))
  assert config.active == ("perception", "planning")
  student, (teacher,) = signals.map_requests(config, 4, (4,))
  assert student.full_layers == () and teacher.text_to_image_layers == (0, 2)
  with pytest.raises(ValueError, match="unknown distill config keys"):
    signals.DistillConfig.from_config({"mixin": []})
  with pytest.raises(ValueError, match="order"):
    signals.DistillConfig(capabilities=("planning", "perception"))
  with pytest.raises(ValueError, match="teacher 1"):
    signals.resolve_signals(signals.DistillConfig(teacher_for=(0, 1, 0)), 4, (4,))
  with pytest.raises(ValueError, match="out of range"):
    signals.map_requests(signals.DistillConfig(), 4, (1,))
