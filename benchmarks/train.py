"""`vla bench train`: training throughput of the demo's DeepSeek-VL2 for each stage on this machine, and the vla stage's
step eager against compiled (torch.compile per transformer block: `vla train ... compile=true`) in the same run.

The model is the demo's (configs/demo.yaml: its language-model overrides of the CPU `test` preset, its vision tower, its
micro-batch) on 64-px tiles; data is generated scene-language data (64-px images: 2 tiles, 41 image tokens each). Each
stage (align: vision tower + adaptor only; pretrain: everything, 30% text-only; sft: everything, answers only; vla:
everything, robot mixture of two embodiments + 25% scene VQA, action tokens counted as sequence tokens) runs full
optimizer steps through the trainer's step function (forward, backward, clipping, AdamW) after warmup steps. The vla
stage then runs again from the same seed with its blocks compiled: the row gives its step time after the warmup steps
(which pay the compilation, reported apart as compile_s; `compiled_graphs_in_timed_steps` counts the graphs compiled
after them, 0 when the step time holds no compilation) and the largest loss difference from the eager run over all its
steps (the same batches from the same weights); the vla stage also runs eager twice, and the largest difference between
those two is the floor (0 where the kernels are deterministic). Reported: tokens/s (all non-padding tokens, images
included), samples/s, seconds per step, and the peak resident memory of the process (`resource.getrusage`, a running
maximum: the value after a stage covers it and every stage before it; on a GPU the peak allocated device memory of each
stage instead). Runs on 1 torch thread unless `threads=N` is given. `steps=N` sets the vla stage's timed steps (default
20). `compile=false` skips the compiled row. `device=auto|cpu|cuda` (auto: CUDA when there is one) and
`precision=auto|bf16|fp32` (the trainer's: bf16 autocast on CUDA, fp32 on CPU) pick where and how it runs;
`compile_mode=` is torch.compile's mode for the compiled row (default: its default). `rows=[vla]` (any of align,
pretrain, sft, vla) runs only those stages; the vla stage's rows always run. `data_workers=N`: every row draws its
batches in N processes ahead of the step (the trainer's `data_workers`).
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._util import print_table, setup

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


def demo_model() -> tuple[dict, dict, int]:
    """The demo's language-model and vision-tower overrides and micro-batch (configs/demo.yaml)."""
    from vla.config import load_config

    demo = load_config("demo")
    return dict(demo.model), dict(demo.vision or {}), int(demo.micro_batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_task(stage: str, out_dir: Path, seed: int, language: dict, vision: dict):
    """The stage's task on the demo's model and this benchmark's data, seeded, with its freezing applied; returns
    (task, parameter groups)."""
    from vla.train.stages import StageContext, apply_freezing, make_stage_task
    from vla.train.trainer import seed_everything

    seed_everything(seed)
    ctx = StageContext(name=stage, out_dir=out_dir, seed=seed, model_language=language, model_vision=vision,
                       trainable=STAGES[stage], lr_mult={"vision_tower": 0.1} if stage != "align" else {},
                       data=vla_data(out_dir / "data", seed) if stage == "vla" else {"generate": 64})
    task = make_stage_task(ctx)
    groups = task.parameter_groups()
    apply_freezing(groups)
    return task, groups


def bench_stage(stage: str, out_dir: Path, micro_batch: int, steps: int, warmup: int, seed: int,
                language: dict, vision: dict, compiled: bool = False, device: torch.device = torch.device("cpu"),
                precision: str = "auto", compile_mode: str | None = None, data_workers: int = 0) -> dict:
    from backbone.deepseek_vl2 import compile_blocks
    from vla.train.stages import PrefetchedBatches
    from vla.train.trainer import DistInfo, OptimConfig, Trainer, TrainerConfig, build_optimizer

    task, groups = stage_task(stage, out_dir, seed, language, vision)
    task.module.to(device)
    task.module.train()
    if compiled:
        compile_blocks(task.module, mode=compile_mode)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(task, TrainerConfig(out_dir=out_dir, steps=steps + warmup, micro_batch=micro_batch,
                                          precision=precision, data_workers=data_workers, log={"progress": False},
                                          optim=OptimConfig(lr=1e-4)),
                      DistInfo(device=device))
    optimizer = build_optimizer(dict(task.module.named_parameters()), groups, trainer.config.optim)
    task.attach(optimizer)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    batches = trainer.batches()
    losses = []
    t_start = time.perf_counter()
    for _ in range(warmup):
        losses.append(trainer._train_step(task.module, optimizer, batches, trainable)[0])
    _sync(device)
    graphs_before = _graphs_compiled()
    tokens, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        loss, _, step_tokens = trainer._train_step(task.module, optimizer, batches, trainable)
        losses.append(loss)
        tokens += step_tokens
    _sync(device)
    seconds = time.perf_counter() - t0
    graphs_timed = _graphs_compiled() - graphs_before  # compiles inside the timed steps (a batch shape new there)
    if isinstance(batches, PrefetchedBatches):  # as Trainer.run does: stop its workers
        batches.close()
    n_params = sum(p.numel() for p in task.module.parameters())
    n_train = sum(p.numel() for p in trainable)
    memory = {"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20} if device.type == "cuda" else {}
    return memory | {"tokens_per_s": tokens / seconds, "samples_per_s": steps * micro_batch / seconds,
            "s_per_step": seconds / steps, "tokens_per_step": tokens / steps, "params": n_params,
            "trainable_params": n_train, "peak_rss_mb": _peak_rss_mb(), "warmup_s": t0 - t_start, "losses": losses,
            "graphs_compiled_in_timed_steps": graphs_timed}


def _graphs_compiled() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _max_loss_diff(a: dict, b: dict) -> float:
    """Largest |loss difference| between two runs of a stage, step by step."""
    return max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name}: this machine has no CUDA device")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run(cfg) -> dict:
    setup(cfg)
    if int(cfg.get("threads", 0) or 0) <= 0:
        # One thread unless asked: on a shared CPU, OpenMP threads spin-waiting for a descheduled peer make
        # multi-threaded step times swing by 10-50x (measured here: 0.05 s vs 0.2-3 s per forward).
        torch.set_num_threads(1)
    quick = bool(cfg.get("quick", False))
    with_compiled = bool(cfg.get("compile", True))
    device = _device(str(cfg.get("device", "auto") or "auto"))
    precision = str(cfg.get("precision", "auto") or "auto")
    compile_mode = cfg.get("compile_mode") or None
    data_workers = int(cfg.get("data_workers", 0) or 0)
    language, vision, demo_micro_batch = demo_model()
    micro_batch, steps, warmup = (4, 3, 3) if quick else (demo_micro_batch, 10, 3)  # first steps pay one-off setup
    vla_steps = int(cfg.get("steps", 0) or 0) or (3 if quick else 20)
    if device.type == "cuda":  # steps of milliseconds: more of them, and compilation's recompiles all in the warmup
        steps, warmup = 3 * steps, 2 * warmup
    seed = int(cfg.get("seed", 0) or 0)
    stages = [str(r) for r in (cfg.get("rows") or [])] or list(STAGES)
    if unknown := sorted(set(stages) - set(STAGES)):
        raise ValueError(f"rows={unknown}: the stages are {list(STAGES)}")
    stages = [s for s in STAGES if s in stages or s == "vla"]  # the vla rows always run
    results: dict[str, dict] = {}
    memory = "peak GPU MB" if device.type == "cuda" else "peak RSS MB"
    header = ["stage", "trainable/params", "tokens/step", "tokens/s", "samples/s", "s/step", memory]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        # the vla stage eager a second time: how far two eager runs of the same batches drift apart (0 where the
        # kernels are deterministic; on a GPU, atomic adds set a floor under the compiled row's difference)
        runs = [(stage, stage, False) for stage in stages] + [("vla_repeat", "vla", False)] + \
            ([("vla_compiled", "vla", True)] if with_compiled else [])
        for name, stage, compiled in runs:
            r = bench_stage(stage, Path(tmp) / name, micro_batch, vla_steps if stage == "vla" else steps, warmup, seed,
                            dict(language), dict(vision), compiled=compiled, device=device, precision=precision,
                            compile_mode=compile_mode, data_workers=data_workers)
            results[name] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "losses"}
            results[name]["losses"] = r["losses"]
            rows.append([name.replace("_", " "), f"{r['trainable_params']:,}/{r['params']:,}", r["tokens_per_step"],
                         r["tokens_per_s"], r["samples_per_s"], r["s_per_step"], r.get("peak_gpu_mb", r["peak_rss_mb"])])
    print_table(header, rows)
    eager = results["vla"]
    floor = _max_loss_diff(eager, results["vla_repeat"])
    summary: dict = {"eager_repeat_max_loss_diff": floor}
    print(f"vla stage eager run twice: largest loss difference over {len(eager['losses'])} steps {floor:.2e}")
    if with_compiled:
        comp = results["vla_compiled"]
        diff = _max_loss_diff(eager, comp)
        summary |= {"compiled_speedup": round(eager["s_per_step"] / comp["s_per_step"], 3),
                    "compile_s": round(comp["warmup_s"] - eager["warmup_s"], 1), "compiled_max_loss_diff": diff,
                    "compiled_loss_steps": len(comp["losses"]),
                    "compiled_graphs_in_timed_steps": comp["graphs_compiled_in_timed_steps"]}
        print(f"vla stage compiled / eager: {summary['compiled_speedup']:.2f}x per step after warmup; compilation "
              f"~{summary['compile_s']:.0f} s; largest loss difference over {len(comp['losses'])} steps {diff:.2e}; "
              f"graphs compiled inside the timed steps: {comp['graphs_compiled_in_timed_steps']}")
    for r in results.values():
        r.pop("losses")
    return {"benchmark": "train", "quick": quick, "micro_batch": micro_batch, "steps": steps, "vla_steps": vla_steps,
            "threads": torch.get_num_threads(), "device": _device_name(device), "precision": precision,
            "compile_mode": compile_mode, "data_workers": data_workers,
            "model": {"preset": "test", **language, "vision": vision, "tile": 64},
            "stages": results, **summary}
