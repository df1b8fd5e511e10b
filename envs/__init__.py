"""envs: gymnasium environments, LeRobot datasets, mixtures and rollouts. Knows nothing of model internals."""
