"""Does the arm's policy know where the target is once it has passed it? An overshoot probe.

For each of `--scenes` arm scenes (2-3 objects, validation seeds 7000+), the scripted expert drives the end effector
to the named target; the arm then keeps moving the way it arrived, at full joint speed, for k = 0, 2, 4, 6 more steps
(k = 0: just inside the success radius; k >= 2: past the target). At that state the policy (one forward pass, the
first action of its chunk) is asked for its step, and the probe reports the cosine between the end effector's
resulting velocity and the direction to the target: +1 = straight back to it, -1 = straight on, away from it.

    python docs/experiments/overshoot_probe.py outputs/demo/policy [--scenes 40]

Prints one JSON line: per k, the mean distance to the target and the mean cosine, and the share pointing away.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

OVERSHOOT_STEPS = (0, 2, 4, 6)


def overshot_env(seed: int, steps: int):
    """An arm env (unwrapped) whose expert reached the target and then went on `steps` steps at full speed."""
    import gymnasium as gym

    from envs.arm_reach import JOINT_HIGH, JOINT_LOW, MAX_JOINT_SPEED, SUCCESS_RADIUS

    env = gym.make("vla/ArmReach-v0", image_size=64, num_objects=[2, 3]).unwrapped
    env.reset(seed=seed)
    for _ in range(200):
        action = env.expert_action()
        env.q = np.clip(env.q + action * MAX_JOINT_SPEED, JOINT_LOW, JOINT_HIGH)
        if env._distance() < SUCCESS_RADIUS:
            break
    onward = action / max(float(np.abs(action).max()), 1e-6)  # the arrival direction, at full joint speed
    for _ in range(steps):
        env.q = np.clip(env.q + onward * MAX_JOINT_SPEED, JOINT_LOW, JOINT_HIGH)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7000)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    import envs  # noqa: F401  (registers the built-in envs)
    from envs.arm_reach import MAX_JOINT_SPEED, jacobian
    from vla.policy import VLAPolicy
    from vla.policy.env_policy import EnvPolicy

    policy = VLAPolicy.load(args.checkpoint)
    policy.config.n_action_steps = 1
    result = {"checkpoint": args.checkpoint, "scenes": args.scenes}
    for steps in OVERSHOOT_STEPS:
        arms = [overshot_env(seed, steps) for seed in range(args.seed, args.seed + args.scenes)]
        observations = [arm._observation() for arm in arms]
        batch = {"pixels": {camera: np.stack([o["pixels"][camera] for o in observations]) for camera in ("top", "wrist")},
                 "agent_pos": np.stack([o["agent_pos"] for o in observations]), "task": [arm.task for arm in arms]}
        actor = EnvPolicy(policy, "arm3")
        actor.reset()
        actions = actor.select_action(batch)
        distance, cosine = [], []
        for arm, action in zip(arms, np.asarray(actions)):
            to_target = arm.target.pos - arm._tip()
            velocity = jacobian(arm.q) @ (action * MAX_JOINT_SPEED)
            distance.append(float(np.linalg.norm(to_target)))
            cosine.append(float(velocity @ to_target / (np.linalg.norm(velocity) * np.linalg.norm(to_target) + 1e-9)))
        result[f"overshoot_{steps}"] = {"distance": round(float(np.mean(distance)), 3),
                                        "cosine": round(float(np.mean(cosine)), 2),
                                        "away": round(float(np.mean(np.array(cosine) < 0)), 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
