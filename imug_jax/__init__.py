"""IMUG-Bench in JAX: multi-turn interleaved image-text evaluation of unified models.

Paper: arXiv 2606.09169. Owns the benchmark data, the rollout runner, scoring and test-time
scaling; imports from drivekd_jax (decoder, sampler, tokenizer), never the other way.
"""
