"""vla eval policy=<spec> env=<gym id or [list]> episodes=N [batch_size=8] [async=true] [out=DIR] [videos=2]

Rolls a policy out in gymnasium vector envs (sync or async) and reports success rate, return and episode length per
env, embodiment and task; writes summary.json, summary.md and GIFs of the first episodes to `out`, and prints the
markdown table and, last, one JSON line with the overall numbers.

Policies: random, expert (the env's scripted expert), prior (the action prior of dataset=ROOT, blind to images),
checkpoint:DIR (a trained VLAPolicy), remote:ws://HOST:PORT (a `vla serve` server; policy_options={api_key: KEY}),
lerobot:DIR (any LeRobot policy checkpoint, e.g. lerobot-train's ACT or Diffusion Policy; vla/policy/lerobot_checkpoint.py), or
anything registered with envs.rollout.register_policy_factory / given as package.module:factory. See envs/policies.py
for the policy protocol. `image_size=null` (the default) renders the built-in envs at their default size (96), or at
the size a lerobot:DIR checkpoint records.

Held-out guard: `train_datasets=[ROOT, ...]` (the policy's training data) and `dataset=ROOT` name datasets whose
recorded collection seeds (meta/collection.json) the eval seeds must not overlap; an overlap is refused with one line.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time

from omegaconf import OmegaConf


def env_ids(value) -> list[str]:
    import envs

    if isinstance(value, str):
        if value in ("builtin", "all"):
            return list(envs.BUILTIN_ENVS)
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def main(cfg) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from envs.rollout import evaluate, markdown_table
    from vla.commands import register_env_policies
    from vla.policy import lerobot_checkpoint

    register_env_policies()  # policy=checkpoint:DIR, lerobot:DIR, remote:ws://HOST:PORT

    config = OmegaConf.to_container(cfg, resolve=True)
    for module in config["import_modules"]:
        importlib.import_module(module)  # may register policy factories or envs
    out = config["out"] or os.path.join("outputs", "eval", f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', config['policy'])}-{time.strftime('%Y%m%d-%H%M%S')}")
    options = dict(config["policy_options"])
    options.setdefault("dataset", config["dataset"])
    options.setdefault("prior_mode", config["prior_mode"])
    image_size = config["image_size"]
    if image_size is None and str(config["policy"]).startswith(f"{lerobot_checkpoint.PREFIX}:"):
        image_size = lerobot_checkpoint.recorded_image_size(config["policy"].split(":", 1)[1])
    summary = evaluate(
        config["policy"],
        env_ids(config["env"]),
        episodes=int(config["episodes"]),
        batch_size=int(config["batch_size"]),
        asynchronous=bool(config["async"]),
        out=out,
        videos=int(config["videos"]),
        seed=int(config["seed"]),
        image_size=image_size,
        import_modules=config["import_modules"],
        policy_options=options,
        max_steps=int(config["max_steps"]),
        env_kwargs={env_id: dict(config.get("env_kwargs") or {}) for env_id in env_ids(config["env"])},
        train_datasets=list(config.get("train_datasets") or []),
    )
    print(markdown_table(summary, config["policy"]))
    print(f"wrote {out}/summary.json, {out}/summary.md and {len(summary['videos'])} videos")
    print(json.dumps({"policy": config["policy"], "out": out, **summary["overall"], "per_env": {k: v["success_rate"] for k, v in summary["per_env"].items()}, "skipped": [s["env_id"] for s in summary["skipped"]]}))
    return 0
