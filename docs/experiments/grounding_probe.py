"""Does a grounding policy (`ground_target`) find the object its instruction names? On validation scenes (env seeds
5000+, 2-3 objects), the first frame of each episode, told the target and told another object of the scene: the box the
policy says before it acts (`VLAPolicy.last_grounding`) against the named object's true box
(`envs.scene_language.named_object_grounding`): IoU >= 0.5, and whether the box's centre is nearest the named
object's among the scene's objects (the policy picked the right object).

    python docs/experiments/grounding_probe.py <policy dir> [--scenes 200]

Prints one JSON line per robot and instruction.
"""

from __future__ import annotations

import argparse
import json

import gymnasium as gym
import numpy as np
import torch

import envs  # noqa: F401  (registers the built-in envs)
from envs.scene_language import box_iou, named_object_grounding, parse_grounding, to_det
from vla.policy import VLAPolicy
from vla.policy.env_policy import EnvPolicy

ROBOTS = {"vla/PointNav-v0": "point2d", "vla/ArmReach-v0": "arm3"}


def centre(box):
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def probe(policy: VLAPolicy, env_id: str, instruction: str, scenes: int, batch: int = 20) -> dict:
    actor = EnvPolicy(policy, ROBOTS[env_id])
    hits = picks = said = 0
    for first in range(0, scenes, batch):
        envs_, obs = [], []
        for seed in range(5000 + first, 5000 + min(first + batch, scenes)):
            env = gym.make(env_id, image_size=64, num_objects=[2, 3], instruction=instruction)
            o, _ = env.reset(seed=seed)
            envs_.append(env)
            obs.append(o)
        observation = {"pixels": {c: np.stack([o["pixels"][c] for o in obs]) for c in obs[0]["pixels"]},
                       "agent_pos": np.stack([o["agent_pos"] for o in obs]), "task": [e.unwrapped.task for e in envs_]}
        policy.reset()
        with torch.no_grad():
            policy.predict_action_chunk(actor.observation_batch(observation))
        for env, text in zip(envs_, policy.last_grounding):
            truth = named_object_grounding(env)
            boxes = [b for _, bs in parse_grounding(text) for b in bs]
            if not boxes:
                continue
            said += 1
            hits += box_iou(boxes[0], truth["det"]) >= 0.5
            gt = env.unwrapped.scene_ground_truth()
            size = gt["image_size"][0]
            objects = {f"the {o['name']}": centre(to_det(o["bbox"], size, size)) for o in gt["objects"]}
            nearest = min(objects, key=lambda ref: np.linalg.norm(objects[ref] - centre(boxes[0])))
            picks += nearest == truth["ref"]
    return {"env": env_id, "instruction": instruction, "scenes": scenes, "box_said": said / scenes,
            "iou_0.5": round(hits / scenes, 3), "named_object_picked": round(picks / scenes, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("policy")
    parser.add_argument("--scenes", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    policy = VLAPolicy.load(args.policy)
    if not policy.config.ground_target:
        raise SystemExit(f"{args.policy}: not a grounding policy (ground_target is off)")
    for env_id in ROBOTS:
        for instruction in ("target", "other"):
            print(json.dumps(probe(policy, env_id, instruction, args.scenes)))


if __name__ == "__main__":
    main()
