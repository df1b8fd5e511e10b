"""The policy: the DeepSeek-VL2 VLA model (`model`), its checkpoint layout (`checkpoint`), LoRA through peft (`lora`),
expert-routing measurements (`routing`), and the adapters that let it act in rollouts (`env_policy`: ours in the
built-in envs; `lerobot_checkpoint`: any LeRobot policy checkpoint in the same rollouts)."""

from vla.policy.checkpoint import BACKBONE_DIR, POLICY_CONFIG, POLICY_WEIGHTS
from vla.policy.model import (ACTION, IMAGE, KIND_NAMES, PAD, STATE, TEXT, SequenceBatch, VLAPolicy, VLAPolicyConfig,
                              build_policy)

__all__ = ["ACTION", "BACKBONE_DIR", "IMAGE", "KIND_NAMES", "PAD", "POLICY_CONFIG", "POLICY_WEIGHTS", "STATE", "TEXT",
           "SequenceBatch", "VLAPolicy", "VLAPolicyConfig", "build_policy"]
