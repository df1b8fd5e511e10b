"""A trained VLA policy acting in our gymnasium envs (envs.rollout's policy protocol).

`vla eval policy=checkpoint:DIR env=...` builds an `EnvPolicy` per env: it maps the env's observation (uint8 camera
frames, raw `agent_pos`, task strings) to the policy's batch (frames in [0, 1], state normalized with the dataset stats
saved in the checkpoint), asks the policy for a normalized action, and unnormalizes it for that robot.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from envs.normalize import Normalizer
from envs.rollout import PolicyContext
from vla.policy import VLAPolicy

ACTION, STATE = "action", "observation.state"


class EnvPolicy:
    def __init__(self, policy: VLAPolicy, embodiment: str):
        self.policy = policy
        self.embodiment = policy.registry.get(embodiment)
        stats = policy.normalizer_stats.get(embodiment)
        if stats is None:
            raise KeyError(f"checkpoint has no normalizer stats for embodiment {embodiment!r} "
                           f"(has: {sorted(policy.normalizer_stats)})")
        self.normalizer = Normalizer.from_dict(stats)

    def reset(self) -> None:
        self.policy.reset()

    def observation_batch(self, observation: dict[str, Any]) -> dict[str, Any]:
        batch: dict[str, Any] = {"embodiment": self.embodiment.name}
        for camera, frames in observation["pixels"].items():
            pixels = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float() / 255.0
            batch[f"observation.images.{camera}"] = pixels
        state = torch.as_tensor(np.asarray(observation["agent_pos"]), dtype=torch.float32)
        batch[STATE] = self.normalizer.normalize(STATE, state).float() if STATE in self.normalizer.modes else state
        batch["task"] = list(observation.get("task", [""] * len(state)))
        return batch

    @torch.no_grad()
    def select_action(self, observation: dict[str, Any]) -> np.ndarray:
        action = self.policy.select_action(self.observation_batch(observation))[:, : self.embodiment.action_dim]
        return self.normalizer.unnormalize(ACTION, action.cpu().double()).numpy()


def _checkpoint_factory(argument: str, context: PolicyContext) -> EnvPolicy:
    path = argument or context.options.get("checkpoint")
    if not path:
        raise ValueError("policy=checkpoint:DIR needs a checkpoint folder")
    cache = context.options.setdefault("_loaded_policies", {})
    if path not in cache:  # one load per eval run, shared by the envs
        cache[path] = VLAPolicy.load(path, merge_adapters=True)  # a LoRA checkpoint folded into its base
        if context.options.get("compile") and cache[path].generates:
            cache[path].compile_decoding()  # the first chunk that generates compiles (tens of seconds on a CPU)
    if context.embodiment is None:
        raise ValueError(f"env {context.env_id} has no known embodiment; the policy cannot pick its action space")
    return EnvPolicy(cache[path], context.embodiment.name)

