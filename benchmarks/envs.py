"""`vla bench envs [--quick]`: cost of one env step (physics + rendering every camera) of each built-in env.

Budget from issue 4: under 2 ms per step at 96x96 and under 5 ms at 224x224. Steps are driven by the scripted expert
(resetting when an episode ends, reset time excluded) and by uniform random actions; the reported time is the median
over repeats of the mean step time.
"""

from __future__ import annotations

import statistics
import time

import gymnasium as gym
import numpy as np

import envs

BUDGET_MS = {96: 2.0, 224: 5.0}


def time_steps(env_id: str, image_size: int, steps: int, repeats: int, policy: str) -> float:
    """Median over `repeats` of the mean milliseconds per `env.step` (expert or random actions)."""
    env = gym.make(env_id, image_size=image_size)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    episode = 0
    results = []
    for _ in range(repeats):
        elapsed = 0.0
        for _ in range(steps):
            if policy == "expert":
                action = env.unwrapped.expert_action()
            else:
                action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
            start = time.perf_counter()
            _, _, terminated, truncated, _ = env.step(action)
            elapsed += time.perf_counter() - start
            if terminated or truncated:
                episode += 1
                env.reset(seed=episode)
        results.append(elapsed / steps * 1e3)
    env.close()
    return statistics.median(results)


def run(cfg) -> dict:
    quick = bool(cfg.get("quick", False))
    steps, repeats = (200, 3) if quick else (1000, 5)
    print(f"{'env':<20} {'size':>5} {'expert ms/step':>15} {'random ms/step':>15} {'budget':>7}  ok")
    results: dict[str, dict] = {}
    all_ok = True
    for env_id in envs.BUILTIN_ENVS:
        for size, budget in BUDGET_MS.items():
            expert_ms = time_steps(env_id, size, steps, repeats, "expert")
            random_ms = time_steps(env_id, size, steps, repeats, "random")
            ok = max(expert_ms, random_ms) < budget
            all_ok &= ok
            print(f"{env_id:<20} {size:>5} {expert_ms:>15.3f} {random_ms:>15.3f} {budget:>7.1f}  {'yes' if ok else 'NO'}", flush=True)
            results[f"{env_id}@{size}"] = {"expert_ms": round(expert_ms, 4), "random_ms": round(random_ms, 4), "budget_ms": budget}
    return {"benchmark": "envs", "quick": quick, "steps": steps, "repeats": repeats, "all_within_budget": all_ok, "results": results}
