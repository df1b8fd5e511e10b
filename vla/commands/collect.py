"""vla collect env=<gym id> episodes=N root=DIR [noise=0.1] [seed=0] [image_size=96] [overwrite=true]
vla collect kind=scene_language stage=align|pretrain|sft episodes=N root=DIR [env=builtin]

Runs the env's scripted expert (optionally with Gaussian action noise) and writes the episodes as a LeRobotDataset v3
(images inside the parquet files, stats with q01/q99, robot_type = the embodiment). Offline; refuses to overwrite an
existing dataset unless overwrite=true. See envs/collect.py.

kind=scene_language writes N caption / grounding / QA records of a training stage as DeepSeek-VL2 style JSONL plus
PNGs (root/<stage>.jsonl, root/images/), from the built-in envs' scenes; see envs/scene_language.py.
"""

from __future__ import annotations

import dataclasses
import json
import os

from omegaconf import OmegaConf


def scene_language(cfg) -> int:
    from pathlib import Path

    from envs.scene_language import generate_scene_language
    from vla.commands.evaluate import env_ids

    target = Path(cfg.root) / f"{cfg.stage}.jsonl"
    if target.exists() and not cfg.overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=true to replace it")
    ids = env_ids("builtin" if cfg.env in (None, "builtin", "all") else cfg.env)
    path = generate_scene_language(cfg.root, cfg.stage, int(cfg.episodes), seed=int(cfg.seed), env_ids=ids, image_size=int(cfg.image_size))
    print(json.dumps({"jsonl": str(path), "records": int(cfg.episodes), "stage": cfg.stage, "envs": ids}))
    return 0


def main(cfg) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.kind == "scene_language":
        return scene_language(cfg)
    if cfg.kind != "demos":
        raise ValueError(f"unknown kind {cfg.kind!r}; use demos or scene_language")
    from envs.collect import collect_dataset

    result = collect_dataset(  # an existing folder or a bad option: one line from the CLI
        cfg.env,
        cfg.root,
        int(cfg.episodes),
        repo_id=cfg.repo_id,
        noise=float(cfg.noise),
        label=str(cfg.label),
        seed=int(cfg.seed),
        image_size=int(cfg.image_size),
        overwrite=bool(cfg.overwrite),
        keep_failures=bool(cfg.keep_failures),
        env_kwargs=OmegaConf.to_container(cfg.env_kwargs, resolve=True) if cfg.get("env_kwargs") else None,
    )
    print(json.dumps(dataclasses.asdict(result)))
    return 0
