"""m1jax: the MiniMax-M1 recipe (hybrid lightning-attention MoE + CISPO RL) in JAX."""

import setuptools

setuptools.setup(
    name="m1jax",
    version="0.1.0",
    description="MiniMax-M1 in JAX: hybrid lightning-attention MoE, Pallas kernels, CISPO RL.",
    python_requires=">=3.11",
    # experiments/ and configs/ run from the checkout (python -m experiments.train).
    packages=setuptools.find_packages(include=["m1jax", "m1jax.*", "pallas_kernels",
                                               "pallas_kernels.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorstore",
        "absl-py",
        "ml_collections>=1.0",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "matplotlib",
        "tensorboardX",
    ],
    extras_require={
        # CPU torch build (on disk on our machines); transformers is the parity reference.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "transformers==5.24.0"],
        "tokenizers": ["tokenizers"],
    },
)
