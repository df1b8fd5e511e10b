"""`vla train`: train one stage of the DeepSeek-VL2 recipe (align, pretrain, sft) or the VLA stage.

    vla train stage=align out=runs/align
    vla train stage=pretrain init_from=runs/align/checkpoints/step-00000200 out=runs/pretrain
    vla train stage=sft init_from=runs/pretrain/checkpoints/step-00000300 stage.steps=500 micro_batch=8
    vla train stage=sft out=runs/sft resume=true          # after Ctrl-C, a preemption, a crash: continue from the last checkpoint
    torchrun --nproc-per-node 8 -m vla.train stage=sft distributed=fsdp ...   # the same, over 8 processes
    vla train stage=vla init_from=checkpoints/dsvl2-mini "stage.data.datasets=[data/nav,data/arm]" out=runs/vla
    vla train stage=vla init_from=runs/vla/checkpoints/step-00002500 peft.method=lora "stage.data.datasets=[data/nav]"

Each stage starts from `init_from` (a previous stage's checkpoint, or an official-format DeepSeek-VL2 folder or hub id
in the local Hugging Face cache) or, without one, from a random init of `model.preset`. The vla stage reads
LeRobotDatasets (v3: folders or hub ids, each `{root: DIR, weight: W, embodiment: NAME}` if needed);
`peft.method=lora` trains LoRA adapters (`vla merge-lora` folds them into a full policy folder). Outputs in `out`:
checkpoints/step-N (official-format weights + tokenizer + trainer state), metrics.csv, tensorboard/, loss_curve.png,
summary.json. Configs: configs/train.yaml and configs/stage/<stage>.yaml (the `stage.*` keys).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from backbone.checkpoint import checkpoint_folder
from vla.config import load_config, with_settings
from vla.train.stages import StageContext, make_stage_task
from vla.train.trainer import (CheckpointConfig, LogConfig, OptimConfig, ScheduleConfig, Trainer, TrainerConfig,
                               close_distributed, init_distributed, seed_everything)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) else node


def configs_from(cfg: DictConfig, dist) -> tuple[StageContext, TrainerConfig]:
    """The hydra config -> (the stage factory's context, the trainer's config), plain dataclasses."""
    c = _plain(cfg)
    stage = c["stage"]
    out_dir = Path(c["out"])
    # a folder, or a hub id resolved to its folder in the local Hugging Face cache
    init_from, tokenizer = (str(checkpoint_folder(c[k])) if c.get(k) else None for k in ("init_from", "tokenizer"))
    ctx = StageContext(
        name=stage["name"], out_dir=out_dir, seed=int(c["seed"]), init_from=init_from,
        model_preset=c["model"]["preset"], model_language=dict(c["model"].get("language") or {}),
        model_vision=dict(c["model"].get("vision") or {}),
        model_center_image_tokens=c["model"].get("center_image_tokens"),
        tokenizer=tokenizer, tokenizer_vocab=int(c["tokenizer_vocab"]),
        trainable=list(stage.get("trainable") or ["all"]), frozen=list(stage.get("frozen") or []),
        lr_mult=dict(stage.get("lr_mult") or {}), data=dict(stage.get("data") or {}),
        options=dict(stage.get("options") or {}), peft=dict(c.get("peft") or {}), rank=dist.rank, world=dist.world,
        barrier=dist.barrier, meta_init=dist.enabled and c["distributed"] == "fsdp",
    )
    optim = dict(stage.get("optim") or {})
    optim["betas"] = tuple(optim.get("betas", (0.9, 0.95)))
    schedule = dict(stage.get("schedule") or {})
    schedule["milestones"] = tuple(schedule.get("milestones", (0.8, 0.9)))
    trainer = TrainerConfig(
        out_dir=out_dir, steps=int(stage["steps"]), micro_batch=int(c["micro_batch"]), grad_accum=int(c["grad_accum"]),
        seed=int(c["seed"]), device=str(c["device"]), precision=str(c["precision"]),
        activation_checkpointing=bool(c["activation_checkpointing"]), compile=bool(c["compile"]),
        data_workers=int(c["data_workers"]), distributed=str(c["distributed"]),
        resume=bool(c["resume"]), optim=OptimConfig(**optim), schedule=ScheduleConfig(**schedule),
        checkpoint=CheckpointConfig(**c["checkpoint"]), log=LogConfig(**c["log"]),
        extra_info={"stage": stage["name"], "config": c},
    )
    return ctx, trainer


def stage_config(stage: str, settings: Mapping[str, Any] | None = None) -> DictConfig:
    """The training config of one stage (configs/train.yaml with `stage=<stage>`) with nested `settings` merged in,
    e.g. `{"out": ..., "stage": {"steps": 400, "data": {...}}}`: what `vla train stage=<stage> key=value ...` would
    compose, for code that calls `run` directly."""
    return with_settings(load_config("train", [f"stage={stage}"]), settings or {})


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train the configured stage; returns the trainer's summary (losses per step, last checkpoint, ...)."""
    if int(cfg.get("threads", 0) or 0) > 0:
        torch.set_num_threads(int(cfg.threads))
    for module in cfg.get("import_modules") or []:
        importlib.import_module(module)  # may register stage tasks
    if str(cfg.get("distributed")) == "fsdp" and "WORLD_SIZE" not in os.environ:
        raise ValueError("distributed=fsdp shards the model over processes started by torchrun: run "
                         "`torchrun --nproc-per-node N -m vla.train ... distributed=fsdp` (one process: drop it)")
    dist = init_distributed(str(cfg.device))
    ctx, trainer_config = configs_from(cfg, dist)
    trainer_config.out_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        (trainer_config.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    seed_everything(ctx.seed)
    task = make_stage_task(ctx)
    return Trainer(task, trainer_config, dist).run()


def main(cfg: DictConfig) -> int:
    summary = run(cfg)
    close_distributed()
    if summary.get("checkpoint") and (summary.get("final_loss") is not None):
        print(f"stage {summary['stage']}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}; "
              f"checkpoint {summary['checkpoint']}", flush=True)
    return 0
