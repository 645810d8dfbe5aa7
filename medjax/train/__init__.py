"""Training: tasks, optimiser, state, sharding, checkpoints, the builders and the one loop."""
