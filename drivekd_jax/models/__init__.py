"""Networks: the Qwen2/LLaMA decoder, InternViT, InternVL3, presets and checkpoint import.

`from_pretrained(path, dtype=..., sharding=None)` builds an `InternVL` or a `Decoder` from a local
HuggingFace checkpoint directory (see `hf_import`).
"""

from drivekd_jax.models.hf_import import CheckpointError, from_pretrained

__all__ = ["CheckpointError", "from_pretrained"]
