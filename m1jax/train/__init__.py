"""Training: optimizer, train state, checkpoints (orbax), metrics writers, the SFT stage, and the
driver that runs the stages a config asks for (m1jax.train.driver.run_from_config).

Submodules are imported on use so that validating a config stays light (see experiments/train.py).
"""
