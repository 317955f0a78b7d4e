"""Networks: the Qwen2/LLaMA decoder, InternViT, InternVL3, Qwen2.5-VL, presets and checkpoint
import.

`from_pretrained(path, dtype=..., sharding=None)` builds an `InternVL`, a `Qwen25VL` or a
`Decoder` from a local HuggingFace checkpoint directory (see `hf_import`);
`save_pretrained(model, path)` writes one (see `export`).
"""

from drivekd_jax.models.export import save_pretrained
from drivekd_jax.models.hf_import import CheckpointError, from_pretrained

__all__ = ["CheckpointError", "from_pretrained", "save_pretrained"]
