"""IMUG-Bench in JAX: multi-turn interleaved image-text evaluation of unified models (arXiv 2606.09169)."""
