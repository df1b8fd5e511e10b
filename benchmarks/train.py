"""`vla bench train`: training throughput of the demo-size DeepSeek-VL2 for each stage on this machine.

The demo-size model is the CPU `test` preset widened to hidden 192 (4 layers, 8 experts top-2, MLA) with the tiny
SigLIP tower on 64-px tiles; data is generated scene-language data (64-px images: 2 tiles, 41 image tokens each).
Each stage (align: vision tower + adaptor only; pretrain: everything, 30% text-only; sft: everything, answers only;
vla: everything, robot mixture of two embodiments + 25% scene VQA, action tokens counted as sequence tokens)
runs full optimizer steps through the trainer's step function (forward, backward, clipping, AdamW) after warmup
steps. Reported: tokens/s (all non-padding tokens, images included), samples/s, seconds per step, and the peak
resident memory of the process (`resource.getrusage`, a running maximum: the value after a stage covers it and
every stage before it). Runs on 1 torch thread unless `threads=N` is given.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._util import print_table, setup

DEMO_LANGUAGE = dict(hidden_size=192, intermediate_size=384, moe_intermediate_size=96, num_hidden_layers=4)
STAGES = {"align": ["vision"], "pretrain": ["all"], "sft": ["all"], "vla": ["all"]}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def vla_data(root: Path, seed: int) -> dict:
    """Small robot datasets of both built-in embodiments and scene conversations for co-training (stage vla)."""
    from envs.collect import collect_dataset
    from envs.scene_language import generate_scene_language

    collect_dataset("vla/PointNav-v0", root / "nav", 10, image_size=64, seed=seed, progress=False)
    collect_dataset("vla/ArmReach-v0", root / "arm", 10, image_size=64, seed=seed, progress=False)
    vqa = generate_scene_language(root / "lang", "sft", 32, seed=seed, image_size=64)
    return {"datasets": [{"root": str(root / "nav")}, {"root": str(root / "arm")}], "chunk_len": 8,
            "vqa_path": str(vqa), "vqa_ratio": 0.25}


def bench_stage(stage: str, out_dir: Path, micro_batch: int, steps: int, warmup: int, seed: int) -> dict:
    from vla.train.stages import StageContext, apply_freezing, make_stage_task
    from vla.train.trainer import OptimConfig, Trainer, TrainerConfig, build_optimizer, seed_everything

    seed_everything(seed)
    ctx = StageContext(name=stage, out_dir=out_dir, seed=seed, model_language=dict(DEMO_LANGUAGE),
                       trainable=STAGES[stage], lr_mult={"vision_tower": 0.1} if stage != "align" else {},
                       data=vla_data(out_dir / "data", seed) if stage == "vla" else {"generate": 64})
    task = make_stage_task(ctx)
    groups = task.parameter_groups()
    apply_freezing(groups)
    task.module.train()
    trainer = Trainer(task, TrainerConfig(out_dir=out_dir, steps=steps + warmup, micro_batch=micro_batch,
                                          log={"progress": False}, optim=OptimConfig(lr=1e-4)))
    optimizer = build_optimizer(dict(task.module.named_parameters()), groups, trainer.config.optim)
    task.attach(optimizer)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    batches = task.batches(0, 1, micro_batch)
    for _ in range(warmup):
        trainer._train_step(task.module, optimizer, batches, trainable)
    tokens, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        _, _, step_tokens = trainer._train_step(task.module, optimizer, batches, trainable)
        tokens += step_tokens
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in task.module.parameters())
    n_train = sum(p.numel() for p in trainable)
    return {"tokens_per_s": tokens / seconds, "samples_per_s": steps * micro_batch / seconds,
            "s_per_step": seconds / steps, "tokens_per_step": tokens / steps, "params": n_params,
            "trainable_params": n_train, "peak_rss_mb": _peak_rss_mb()}


def run(cfg) -> dict:
    setup(cfg)
    if int(cfg.get("threads", 0) or 0) <= 0:
        # One thread unless asked: on a shared CPU, OpenMP threads spin-waiting for a descheduled peer make
        # multi-threaded step times swing by 10-50x (measured here: 0.05 s vs 0.2-3 s per forward).
        torch.set_num_threads(1)
    quick = bool(cfg.get("quick", False))
    micro_batch, steps, warmup = (4, 3, 3) if quick else (8, 10, 3)  # the first steps of a process pay one-off setup
    results: dict[str, dict] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for stage in STAGES:
            r = bench_stage(stage, Path(tmp) / stage, micro_batch, steps, warmup, int(cfg.get("seed", 0) or 0))
            results[stage] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
            rows.append([stage, f"{r['trainable_params']:,}/{r['params']:,}", r["tokens_per_step"], r["tokens_per_s"],
                         r["samples_per_s"], r["s_per_step"], r["peak_rss_mb"]])
            print_table(["stage", "trainable/params", "tokens/step", "tokens/s", "samples/s", "s/step", "peak RSS MB"],
                        rows) if stage == list(STAGES)[-1] else None
    return {"benchmark": "train", "quick": quick, "micro_batch": micro_batch, "steps": steps,
            "threads": torch.get_num_threads(), "model": {"preset": "test", **DEMO_LANGUAGE, "tile": 64},
            "stages": results}
