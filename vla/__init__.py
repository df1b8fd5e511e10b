"""vla: assembles the DeepSeek-VL2 backbone, the action-token head and the data/rollout code into policies, training stages and a CLI."""
