"""IMUG-Bench data: records and validation (schema), the release on disk (release), the TFDS
builder (tfds_builder) and the synthetic benchmark with exact ground truth (synthetic)."""
