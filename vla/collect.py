"""vla collect env=<gym id> episodes=N root=DIR [noise=0.1] [seed=0] [image_size=96] [overwrite=true]

Runs the env's scripted expert (optionally with Gaussian action noise) and writes the episodes as a LeRobotDataset v3
(images inside the parquet files, stats with q01/q99, robot_type = the embodiment). Offline; refuses to overwrite an
existing dataset unless overwrite=true. See envs/collect.py.
"""

from __future__ import annotations

import dataclasses
import json
import os


def main(cfg) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from envs.collect import collect_dataset

    try:
        result = collect_dataset(
            cfg.env,
            cfg.root,
            int(cfg.episodes),
            repo_id=cfg.repo_id,
            noise=float(cfg.noise),
            seed=int(cfg.seed),
            image_size=int(cfg.image_size),
            overwrite=bool(cfg.overwrite),
            keep_failures=bool(cfg.keep_failures),
        )
    except FileExistsError as error:
        print(f"vla collect: {error}")
        return 1
    print(json.dumps(dataclasses.asdict(result)))
    return 0
