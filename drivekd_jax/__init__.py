"""Drive-KD in JAX: multi-teacher attention distillation of driving VLMs (arXiv 2601.21288).

Owns the networks (InternViT, Qwen2/LLaMA decoder, InternVL3), the sampler, the data pipeline,
the distillation losses and AGP, and the sharded trainer.
"""
