"""Installs drivekd_jax and imug_jax."""

import setuptools

CORE = [
  "jax>=0.10",
  "flax>=0.12.8",
  "optax>=0.2.8",
  "orbax-checkpoint>=0.12",
  "tensorflow-datasets>=4.9.10",
  "importlib_resources",
  "array-record",
  "chex",
  "absl-py",
  "ml-collections",
  "grain>=0.2.18",
  "numpy",
  "pillow",
  "tokenizers",
  "safetensors",
  "tqdm",
  "tensorboardX",
  "opencv-python-headless",
  "pycocoevalcap",
  "matplotlib",
]

# The TPU runtime (libtpu from PyPI) of the pinned JAX: compiles for TPU topologies from any
# machine (`python -m drivekd_jax.bench.plan --topology=v5e:4x4`) and runs on TPU VMs.
TPU = ["jax[tpu]==0.10.2"]

TEST = [
  "pytest",
  "pytest-xdist",
  "ruff",
  "torch==2.13.0",
  "transformers>=5",
  "nbclient",
  "nbformat",
  "ipykernel",
]

setuptools.setup(
  name="drivekd-jax",
  version="0.1.0",
  description=(
    "JAX/Flax reimplementation of Drive-KD (multi-teacher attention"
    " distillation for driving VLMs) and the IMUG-Bench evaluator."
  ),
  packages=setuptools.find_packages(include=["drivekd_jax*", "imug_jax*"]),
  package_data={"imug_jax": ["data/*.json"]},
  py_modules=["launch"],
  python_requires=">=3.11",
  install_requires=CORE,
  extras_require={"test": TEST, "tpu": TPU},
)
