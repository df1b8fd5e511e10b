"""Does the arm's policy know where the target is once it has passed it? An overshoot probe.

For each of `--scenes` arm scenes (2-3 objects, validation seeds 7000+), the scripted expert drives the end effector
to the named target; the arm then keeps moving the way it arrived, at full joint speed, for k = 0, 2, 4, 6 more steps
(k = 0: just inside the success radius; k >= 2: past the target). At that state the policy (one forward pass, the
first action of its chunk) is asked for its step, and the probe reports the cosine between the end effector's
resulting velocity and the direction to the target: +1 = straight back to it, -1 = straight on, away from it.

A second probe asks whether the policy sees where the target is at all: in each scene (the arm as reset) the named
target is moved onto a circle of radius r = 0.08, 0.15, 0.3 around the end effector, at 8 angles, and the frame is
drawn again; the same cosine says whether the policy's step follows it (a policy that reads the target's place gets
near +1 at every angle; one that ignores it, ~0 on average).

    python docs/experiments/overshoot_probe.py outputs/demo/policy [--scenes 40] [--blank top|wrist]

Prints one JSON line: per k (`overshoot_K`) and per radius (`circle_R`) the mean distance to the target, the mean
cosine, the share pointing away, and the scripted expert's mean cosine at the same states (the reference).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

OVERSHOOT_STEPS = (0, 2, 4, 6)
CIRCLE_RADII = (0.08, 0.15, 0.3)


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


def circled_env(seed: int, radius: float, angle: float):
    """An arm env (unwrapped, as reset) with its target moved to `radius` from the end effector at `angle`, or None
    where that place is outside the frame."""
    import gymnasium as gym

    from envs import scene

    env = gym.make("vla/ArmReach-v0", image_size=64, num_objects=[2, 3]).unwrapped
    env.reset(seed=seed)
    x, y = env._tip() + radius * np.array([np.cos(angle), np.sin(angle)])
    margin = env.target.size
    if not (margin <= x <= 1 - margin and margin <= y <= 1 - margin):
        return None
    env.target.x, env.target.y = float(x), float(y)
    env._background = scene.blank(env.image_size)
    env._draw_static(env._background)
    return env


def step_cosines(policy, arms, blank: str | None = None) -> dict[str, float]:
    """The policy's first step at each arm's current frame: mean distance to the target, mean cosine between the end
    effector's velocity and the direction to the target, share pointing away; the expert's mean cosine there.
    `blank` (a camera) shows the policy that camera as empty floor."""
    from envs import scene
    from envs.arm_reach import MAX_JOINT_SPEED, jacobian
    from vla.policy.env_policy import EnvPolicy

    observations = [arm._observation() for arm in arms]
    batch = {"pixels": {camera: np.stack([o["pixels"][camera] for o in observations]) for camera in ("top", "wrist")},
             "agent_pos": np.stack([o["agent_pos"] for o in observations]), "task": [arm.task for arm in arms]}
    if blank:
        batch["pixels"][blank] = np.full_like(batch["pixels"][blank], scene.BACKGROUND)
    actor = EnvPolicy(policy, "arm3")
    actor.reset()
    actions = actor.select_action(batch)

    def cos(arm, action) -> float:
        to_target = arm.target.pos - arm._tip()
        velocity = jacobian(arm.q) @ (action * MAX_JOINT_SPEED)
        return float(velocity @ to_target / (np.linalg.norm(velocity) * np.linalg.norm(to_target) + 1e-9))

    cosine = np.array([cos(arm, action) for arm, action in zip(arms, np.asarray(actions))])
    distance = [float(np.linalg.norm(arm.target.pos - arm._tip())) for arm in arms]
    expert = [cos(arm, arm.expert_action()) for arm in arms]  # the reference: what reading the target gives
    return {"n": len(arms), "distance": round(float(np.mean(distance)), 3), "cosine": round(float(cosine.mean()), 2),
            "away": round(float(np.mean(cosine < 0)), 2), "expert_cosine": round(float(np.mean(expert)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7000)
    parser.add_argument("--blank", choices=["top", "wrist"], default=None,
                        help="show the policy this camera as empty floor (which view carries the target's place?)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    import envs  # noqa: F401  (registers the built-in envs)
    from vla.policy import VLAPolicy

    policy = VLAPolicy.load(args.checkpoint)
    policy.config.n_action_steps = 1
    seeds = range(args.seed, args.seed + args.scenes)
    result = {"checkpoint": args.checkpoint, "scenes": args.scenes, "blank": args.blank}
    for steps in OVERSHOOT_STEPS:
        result[f"overshoot_{steps}"] = step_cosines(policy, [overshot_env(seed, steps) for seed in seeds], args.blank)
    for radius in CIRCLE_RADII:
        arms = [circled_env(seed, radius, angle) for seed in seeds for angle in np.arange(8) * np.pi / 4]
        result[f"circle_{radius:g}"] = step_cosines(policy, [arm for arm in arms if arm is not None], args.blank)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
