"""Janus-Pro (DeepSeek) in Flax NNX: the network (`network`), configurations and presets
(`config`), transformers checkpoints (`checkpoint.from_pretrained`), generation (`generate`) and
the in-process `UnifiedModel` with a jitted multi-turn rollout (`unified`)."""

from imug_jax.models.janus.checkpoint import from_pretrained
from imug_jax.models.janus.config import PRESETS, JanusConfig, JanusVisionConfig, JanusVQConfig
from imug_jax.models.janus.network import Janus

__all__ = [
  "PRESETS",
  "Janus",
  "JanusConfig",
  "JanusVQConfig",
  "JanusVisionConfig",
  "from_pretrained",
]
