"""Training: the config schema and its checks (schema), what a run derives from its config
(context), host <-> device data movement (transfer), the stage with the one loop skeleton
(stage), optimizer, train state, orbax checkpoints, metrics, held-out evaluation, the SFT and RL
loops (sft, rl) and the driver that runs the stages a config asks for (driver.run_from_config).

Submodules are imported on use so that validating a config stays light (experiments/train.py).
"""
