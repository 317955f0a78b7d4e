"""IMUG models: the `UnifiedModel` protocol and /infer messages (protocol), the /infer HTTP client
(http), the palette-patch image tokenizer, the tiny JAX unified model (tiny) and its fit on the
synthetic ground truth (tiny_train)."""
