"""Where do a policy's episodes go? Each episode of the demo's robots (2-3 objects, the named target), on validation
seeds 5000+, counted once as: `success` (the robot came within the success radius of the target), `other` (it never
did, but came within that radius of another object of the scene: it went to the wrong one, or through it), or
`neither`; plus how many came within twice the radius of the target (`target_within_2r`: near misses are those minus
the successes) and, for `neither`, the final distance to the target (sorted).

    python docs/experiments/where_episodes_end.py outputs/demo/policy [--episodes 100]

Prints one JSON line per robot.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

ROBOTS = {"vla/PointNav-v0": "point2d", "vla/ArmReach-v0": "arm3"}


def robot_position(env) -> np.ndarray:
    return env._tip() if hasattr(env, "_tip") else env.agent  # the arm's end effector, the point robot


def episodes_of(policy, env_id: str, embodiment: str, seeds: list[int]) -> list[dict]:
    """One batch of parallel episodes; per episode the closest approach to each object and the final distance."""
    import gymnasium as gym

    from vla.policy.env_policy import EnvPolicy

    vec = gym.vector.SyncVectorEnv([lambda: gym.make(env_id, image_size=64, num_objects=[2, 3]) for _ in seeds])
    observation, _ = vec.reset(seed=seeds)
    tasks = list(vec.call("task"))
    actor = EnvPolicy(policy, embodiment)
    actor.reset()
    n = len(seeds)
    done = np.zeros(n, dtype=bool)
    closest = [dict() for _ in seeds]  # "target" or object index -> closest distance so far
    final = [0.0] * n
    while not done.all():
        action = actor.select_action({**observation, "task": tasks})
        observation, _, terminated, truncated, _ = vec.step(action.astype(np.float32))
        for i in np.flatnonzero(~done):
            env = vec.envs[i].unwrapped  # the state that ended the episode (autoreset waits for the next step)
            position = robot_position(env)
            for j, obj in enumerate(env.objects):
                key = "target" if obj is env.target else j
                closest[i][key] = min(closest[i].get(key, np.inf), float(np.linalg.norm(position - obj.pos)))
            if terminated[i] or truncated[i]:
                done[i] = True
                final[i] = float(np.linalg.norm(position - env.target.pos))
    return [{"closest": c, "final": f} for c, f in zip(closest, final)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=5000)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    import envs  # noqa: F401  (registers the built-in envs)
    from envs import arm_reach, point_nav
    from vla.policy import VLAPolicy

    # the envs' own success test is distance < SUCCESS_RADIUS
    radius = {"vla/PointNav-v0": point_nav.SUCCESS_RADIUS, "vla/ArmReach-v0": arm_reach.SUCCESS_RADIUS}
    policy = VLAPolicy.load(args.checkpoint)
    for env_id, embodiment in ROBOTS.items():
        r = radius[env_id]
        counts = {"success": 0, "other": 0, "neither": 0, "target_within_2r": 0}
        neither_final = []
        for start in range(args.seed, args.seed + args.episodes, 10):
            seeds = list(range(start, min(start + 10, args.seed + args.episodes)))
            for episode in episodes_of(policy, env_id, embodiment, seeds):
                closest = episode["closest"]
                counts["target_within_2r"] += closest["target"] < 2 * r
                if closest["target"] < r:
                    counts["success"] += 1
                elif any(k != "target" and d < r for k, d in closest.items()):
                    counts["other"] += 1
                else:
                    counts["neither"] += 1
                    neither_final.append(round(episode["final"], 3))
        print(json.dumps({"robot": embodiment, "episodes": args.episodes, **counts,
                          "neither_final_distance": sorted(neither_final)}))


if __name__ == "__main__":
    main()
