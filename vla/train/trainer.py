"""The training loop shared by every stage: optimizer, schedule, accumulation, precision, processes, checkpoints.

    trainer = Trainer(task, TrainerConfig(...), dist=init_distributed("auto"))
    summary = trainer.run()

One optimizer step:
  1. take `grad_accum` micro-batches from the task's iterator (this process's shard of the global batch);
  2. sum each loss term's weights (`task.loss_weights`: supervised tokens, sequences, ...) over the micro-batches
     and all processes, so that every term is a mean over the *global* step: the loss (and the update) is the same
     with 1 process x micro-batch 4, 2 processes x 2, or 1 process x 2 x 2 accumulation steps;
  3. forward + backward each micro-batch (bf16 autocast on CUDA, fp32 on CPU), gradient sync only on the last;
  4. clip the gradient norm, AdamW step (which also runs hooks such as the noaux_tc expert-bias update), schedule.
Then log (rank 0), and checkpoint every `checkpoint.every` steps and at the end.

A stop (Ctrl-C, or the SIGTERM a scheduler or torchrun sends) ends the run after the step in progress with a
checkpoint of that step (every process agrees on the step), then raises `TrainingStopped`; `resume=true` continues
from it as if nothing had happened. A second Ctrl-C stops at once (the last checkpoint stays the one to resume).

Processes: `torchrun --nproc-per-node N -m vla.train ...` sets WORLD_SIZE; `distributed: ddp` wraps the module in
DistributedDataParallel, `fsdp` shards it with FSDP2 (`fully_shard` on the task's `fsdp_units()` then the root).
Checkpoints hold full (unsharded) state dicts keyed by parameter name, so they load with any process count.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.tensor import DTensor

from vla.train import checkpoint as ckpt
from vla.train.stages import (ModuleGroup, PrefetchedBatches, ShardedBatches, StageTask, apply_freezing,
                              format_freezing_plan)
from vla.train.log import TrainLogger, plot_loss_curve

# ------------------------------------------------------------------------------------------------------------------
# Configuration (plain dataclasses; vla/train/entry.py converts the hydra config)
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only (not norms, biases, embeddings-as-vectors)
    grad_clip: float = 1.0  # max global gradient norm; <= 0 disables clipping (the norm is still logged)


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | step | constant (all after a linear warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine: final lr / peak lr
    milestones: tuple[float, ...] = (0.8, 0.9)  # step: fractions of the run where the lr is multiplied by gamma
    gamma: float = 0.316


@dataclass
class CheckpointConfig:
    every: int = 50  # steps between checkpoints (and one at the end); 0 = only at the end
    keep_last: int = 2
    keep_best: bool = True  # also keep the checkpoint with the lowest mean train loss since the previous one


@dataclass
class LogConfig:
    every: int = 1
    progress: bool = True
    tensorboard: bool = True
    csv: bool = True
    plot: bool = True


@dataclass
class TrainerConfig:
    out_dir: Path = Path("outputs/train")
    steps: int = 100
    micro_batch: int = 4  # samples per process per micro-batch
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA with bf16, else fp32) | bf16 | fp32
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block before training (backbone.compile_blocks)
    data_workers: int = 0  # processes drawing micro-batches ahead of the step (0: drawn in the step, on this process)
    distributed: str = "ddp"  # ddp | fsdp (used when WORLD_SIZE > 1)
    resume: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    extra_info: dict[str, Any] = field(default_factory=dict)  # stored in train_state.json (stage, config)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")
        if self.schedule.kind not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule kind must be cosine, step or constant, got {self.schedule.kind!r}")
        if self.steps < 1 or self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError("steps, micro_batch and grad_accum must be >= 1")
        if self.data_workers < 0:
            raise ValueError(f"data_workers must be >= 0, got {self.data_workers}")


# ------------------------------------------------------------------------------------------------------------------
# Processes, devices, seeds
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); pick the device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def close_distributed() -> None:
    """Leave the process group together: without the barrier one process may tear its connections down while
    another still uses them, and gloo aborts it at exit ("terminate called without an active exception")."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it (CUDA with bf16), None (fp32) otherwise."""
    if precision == "fp32":
        return None
    if precision not in ("auto", "bf16"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if precision == "bf16" and device.type != "cpu":
        raise ValueError(f"bf16 is not supported on {device}")
    return torch.bfloat16 if precision == "bf16" else None


# ------------------------------------------------------------------------------------------------------------------
# Learning-rate schedule and optimizer
# ------------------------------------------------------------------------------------------------------------------


def lr_factor(step: int, total_steps: int, schedule: ScheduleConfig) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warmup to 1 over
    `warmup_steps`, then cosine to `min_lr_ratio`, a step decay at the milestones, or constant."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.kind == "constant":
        return 1.0
    if schedule.kind == "step":
        return schedule.gamma ** sum(step >= m * total_steps for m in schedule.milestones)
    span = max(1, total_steps - schedule.warmup_steps - 1)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(named_params: dict[str, nn.Parameter], groups: list[ModuleGroup], optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with one parameter group per (module group, decay / no decay); lr = peak lr x the group's multiplier."""
    param_groups = []
    for g in groups:
        if not g.trainable:
            continue
        decay = [named_params[n] for n, p in g.params if p.ndim >= 2]
        no_decay = [named_params[n] for n, p in g.params if p.ndim < 2]
        for suffix, params, wd in (("", decay, optim.weight_decay), ("/no_decay", no_decay, 0.0)):
            if params:
                param_groups.append({"params": params, "lr": optim.lr * g.lr_mult, "weight_decay": wd,
                                     "name": g.name + suffix, "lr_mult": g.lr_mult})
    if not param_groups:
        raise ValueError("no trainable parameters: check stage.trainable / stage.frozen")
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


# ------------------------------------------------------------------------------------------------------------------
# Stopping on a signal
# ------------------------------------------------------------------------------------------------------------------


class TrainingStopped(KeyboardInterrupt):
    """A run stopped by a signal after saving a checkpoint of the step it had finished. A KeyboardInterrupt, so that
    it passes every `except Exception` on its way out, as Ctrl-C does; `exit_code` is the shell's 128 + signal."""

    def __init__(self, signum: int, step: int, steps: int, checkpoint: Path | None):
        self.signum, self.step, self.steps, self.checkpoint = signum, step, steps, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} of {steps}; "
                         f"checkpoint {checkpoint}")


class StopOnSignal:
    """Within `with`: SIGINT and SIGTERM only note that a stop was asked for (the loop reads `asked` after each
    step); a second SIGINT more than a second after the first raises KeyboardInterrupt (the copy torchrun forwards of
    the same key press, which every process of the terminal also gets, is not a second one). The previous handlers
    come back on exit. Outside the main thread (where Python has no signal handlers) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._at = signum, now
        elif signum == signal.SIGINT and now - self._at > 1.0:
            raise KeyboardInterrupt

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def asked(self, dist: DistInfo) -> int | None:
        """The signal that asked for a stop on any process (collective when distributed), or None."""
        if not dist.enabled:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=dist.device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return int(flag.item()) or None


# ------------------------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, task: StageTask, config: TrainerConfig, dist: DistInfo | None = None):
        if not isinstance(task, StageTask):
            raise TypeError(f"{type(task).__name__} is not a vla.train.stages.StageTask: subclass it (it declares every hook "
                            f"the trainer calls, with no-op defaults)")
        self.task, self.config = task, config
        self.dist = dist or DistInfo()
        self.ckpt_root = config.out_dir / "checkpoints"
        self.autocast = autocast_dtype(config.precision, self.dist.device)

    def say(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    # ---- setup -----------------------------------------------------------------------------------------------------
    def _find_resume(self) -> Path | None:
        """Rank 0 picks the newest valid checkpoint (reporting corrupt ones); every process gets the same answer."""
        found = None
        if self.dist.is_main:
            for removed in ckpt.remove_partial(self.ckpt_root):
                self.say(f"removed a partial checkpoint left by an interrupted run: {removed.name}")
            found = ckpt.find_resumable(self.ckpt_root, report=self.say, quarantine=True)
            if found is None:
                self.say(f"resume=true but no valid checkpoint in {self.ckpt_root}: starting from step 0")
        if self.dist.enabled:
            box = [str(found) if found else None]
            torch_dist.broadcast_object_list(box, src=0)
            found = Path(box[0]) if box[0] else None
        return found

    def _wrap(self, module: nn.Module) -> nn.Module:
        """The module as the loss calls it: itself, a DDP wrapper, or sharded in place by FSDP2."""
        if not self.dist.enabled:
            return module
        if self.config.distributed == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            # A task whose batches may leave parameters out of the graph says so (default: assume it may).
            return DistributedDataParallel(module, device_ids=ids,
                                           find_unused_parameters=self.task.ddp_find_unused_parameters)
        from torch.distributed.fsdp import fully_shard

        for unit in self.task.fsdp_units():
            fully_shard(unit)
        fully_shard(module)
        init = self.task.meta_init
        if init is not None:  # built on meta: allocate this process's shards and read them from the files
            from vla.train.fsdp_load import load_sharded

            load_sharded(module, init, self.dist.device)
            self.task.meta_init = None
            self.say(f"FSDP2 from the meta device: each process read its own shards from "
                     f"{', '.join(str(f) for _, f in init.folders)}")
        return module

    def _sync_context(self, model: nn.Module, last_micro: bool):
        """No gradient all-reduce before the last micro-batch of an accumulation (DDP no_sync / FSDP2 flag)."""
        if not self.dist.enabled or self.config.grad_accum == 1:
            return contextlib.nullcontext()
        if self.config.distributed == "ddp":
            return contextlib.nullcontext() if last_micro else model.no_sync()
        model.set_requires_gradient_sync(last_micro)  # FSDP2
        return contextlib.nullcontext()

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, samples: int, loss: float, optimizer, scheduler, batches) -> Path | None:
        """Collective: gather full state dicts to rank 0, which writes the checkpoint atomically and prunes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.task.module, options=options)
        optim_state = get_optimizer_state_dict(self.task.module, optimizer, options=options)
        rng = [None] * self.dist.world
        if self.dist.enabled:
            torch_dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        path = None
        if self.dist.is_main:
            trainer_state = {"step": step, "samples": samples, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                             "data": batches.state_dict(), "rng": rng, "world": self.dist.world}

            def write(folder: Path) -> None:
                self.task.save_weights(folder, model_state)
                torch.save(trainer_state, folder / ckpt.TRAINER_STATE)

            info = {"samples": samples, "loss": loss, "world": self.dist.world} | self.config.extra_info
            path = ckpt.write_checkpoint_dir(self.ckpt_root, step, write, info)
            if self.config.checkpoint.keep_best and math.isfinite(loss):
                ckpt.update_best(self.ckpt_root, step, loss)
            ckpt.prune(self.ckpt_root, self.config.checkpoint.keep_last, self.config.checkpoint.keep_best)
        self.dist.barrier()
        return path

    def _load_trainer_state(self, path: Path, optimizer, scheduler, batches) -> tuple[int, int]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(path / ckpt.TRAINER_STATE, map_location="cpu", weights_only=False)
        # strict=False: a parameter that had no gradient before the checkpoint has no optimizer state yet, as in
        # the uninterrupted run
        set_optimizer_state_dict(self.task.module, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"])
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world else rngs[0])
        return int(state["step"]), int(state["samples"])

    # ---- the loop --------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, task, dist = self.config, self.task, self.dist
        groups = task.parameter_groups()
        apply_freezing(groups)
        if (line := task.describe()) is not None:
            self.say(line)
        self.say(f"freezing plan ({task.name}):\n{format_freezing_plan(groups)}")

        resume_from = self._find_resume() if cfg.resume else None
        on_meta = task.meta_init is not None  # FSDP2 from the meta device: _wrap loads the shards
        if resume_from is not None:
            if on_meta:
                task.meta_init = task.meta_source(resume_from)
            else:
                task.load_weights(resume_from)  # into the plain module, before wrapping / sharding
            self.say(f"resuming from {resume_from}")
        if not on_meta:
            task.module.to(dist.device)
        task.module.train()
        task.set_activation_checkpointing(cfg.activation_checkpointing)
        if cfg.compile:
            from backbone.deepseek_vl2 import compile_blocks

            self.say(f"torch.compile: {compile_blocks(task.module)} transformer blocks (compiled on their first batches)")
        model = self._wrap(task.module)

        named = dict(task.module.named_parameters())
        optimizer = build_optimizer(named, groups, cfg.optim)
        task.attach(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.steps, cfg.schedule))
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        batches = self.batches()
        step, samples = 0, 0
        if resume_from is not None:
            step, samples = self._load_trainer_state(resume_from, optimizer, scheduler, batches)

        logger = TrainLogger(cfg.out_dir, cfg.steps, step, enabled=dist.is_main, progress=cfg.log.progress,
                             csv_log=cfg.log.csv, tensorboard=cfg.log.tensorboard, resumed=resume_from is not None)
        losses: dict[int, float] = {}
        since_ckpt: list[float] = []
        last_ckpt = resume_from
        t_last, tokens_since, samples_since, steps_since = time.perf_counter(), 0.0, 0, 0
        with StopOnSignal() as stop:
            try:
                while step < cfg.steps:
                    lr = cfg.optim.lr * lr_factor(step, cfg.steps, cfg.schedule)  # this step's lr (multiplier 1)
                    loss_value, scalars, tokens = self._train_step(model, optimizer, batches, trainable)
                    scheduler.step()
                    step += 1
                    step_samples = cfg.micro_batch * cfg.grad_accum * dist.world
                    samples += step_samples
                    losses[step] = loss_value
                    since_ckpt.append(loss_value)
                    tokens_since, samples_since, steps_since = tokens_since + tokens, samples_since + step_samples, steps_since + 1
                    elapsed = time.perf_counter() - t_last
                    tok_s = tokens_since / max(elapsed, 1e-9)
                    logger.progress(step, loss_value, lr, tok_s)
                    if step % cfg.log.every == 0 or step == cfg.steps:
                        scalars |= {"train/loss": loss_value, "train/lr": lr, "train/tokens_per_s": tok_s,
                                    "train/samples_per_s": samples_since / max(elapsed, 1e-9)}
                        logger.log(step, scalars)
                        t_last, tokens_since, samples_since, steps_since = time.perf_counter(), 0.0, 0, 0
                    saved = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.steps
                    if saved:
                        last_ckpt = self.save_checkpoint(step, samples, float(np.mean(since_ckpt)), optimizer, scheduler, batches)
                        since_ckpt = []
                    if step < cfg.steps and (signum := stop.asked(dist)) is not None:
                        self.say(f"{signal.Signals(signum).name}: stopping after step {step}, with a checkpoint")
                        if not saved:
                            last_ckpt = self.save_checkpoint(step, samples, float(np.mean(since_ckpt)), optimizer, scheduler, batches)
                        raise TrainingStopped(signum, step, cfg.steps, last_ckpt)
            finally:
                logger.close()
                if isinstance(batches, PrefetchedBatches):
                    batches.close()
        summary = {"stage": task.name, "steps": step, "samples": samples, "losses": losses,
                   "final_loss": losses.get(step), "checkpoint": str(last_ckpt) if last_ckpt else None,
                   "best": ckpt.read_best(self.ckpt_root)}
        if dist.is_main:
            if cfg.log.plot and cfg.log.csv:
                png = plot_loss_curve(cfg.out_dir / "metrics.csv", cfg.out_dir / "loss_curve.png", title=f"stage {task.name}")
                summary["loss_curve"] = str(png) if png else None
            (cfg.out_dir / "summary.json").write_text(json.dumps(summary | {"losses": {str(k): v for k, v in losses.items()}}, indent=2))
        return summary

    def batches(self):
        """The task's micro-batches for this process, drawn ahead by `data_workers` processes when set."""
        cfg, dist = self.config, self.dist
        batches = self.task.batches(dist.rank, dist.world, cfg.micro_batch)
        if cfg.data_workers and isinstance(batches, ShardedBatches):
            batches = PrefetchedBatches(batches, cfg.data_workers, pin_memory=dist.device.type == "cuda")
        return batches

    def _train_step(self, model: nn.Module, optimizer, batches, trainable: list[nn.Parameter]) -> tuple[float, dict[str, float], float]:
        """One optimizer step over `grad_accum` micro-batches; returns (global loss, scalars, global tokens)."""
        cfg, dist, task = self.config, self.dist, self.task
        micro = [self._to_device(next(batches)) for _ in range(cfg.grad_accum)]
        weights = [task.loss_weights(b) for b in micro]
        totals = self._global_totals(weights)

        # every term the task declares, also where this process's micro-batches lack it (the reduce needs them all)
        logged: dict[str, torch.Tensor] = {name: torch.zeros((), device=dist.device) for name in totals}
        metric_sums: dict[str, float] = {}
        tokens = 0.0
        for i, batch in enumerate(micro):
            with self._sync_context(model, last_micro=i == cfg.grad_accum - 1):
                with torch.autocast(dist.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
                    out = task.loss(model, batch)
                total = 0.0
                for name, value in out.terms.items():
                    # weight of this micro-batch's mean in the global mean of the term (x world: DDP/FSDP average)
                    weight = weights[i].get(name) if weights[i] is not None else None
                    share = weight / max(totals[name], 1e-12) if weight is not None else 1.0 / (cfg.grad_accum * dist.world)
                    total = total + value.float() * (share * dist.world)
                    logged[name] = logged.get(name, 0.0) + value.detach().float() * share
                total.backward()
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v) / cfg.grad_accum
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            if out.tokens is not None:
                tokens += float(out.tokens)
            else:
                tokens += float(mask.sum()) if isinstance(mask, torch.Tensor) else float(cfg.micro_batch)

        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        if isinstance(grad_norm, DTensor):  # FSDP2: the norm of the sharded gradients
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        names = sorted(logged)
        values = torch.stack([logged[n] for n in names] + [torch.tensor(tokens, device=logged[names[0]].device)]).detach()
        if dist.enabled:
            torch_dist.all_reduce(values)
            metric_sums = self._mean_metrics(metric_sums)
        term_values = {n: float(values[i]) for i, n in enumerate(names)}
        loss_value = sum(term_values.values())
        scalars = {f"loss/{n}": v for n, v in term_values.items()} | metric_sums | {"train/grad_norm": float(grad_norm)}
        return loss_value, scalars, float(values[-1])

    def _global_totals(self, weights: list[dict[str, float] | None]) -> dict[str, float]:
        """Per loss term, the sum of its weights over the micro-batches of this step on every process."""
        if weights[0] is None:
            return {}
        names = sorted(weights[0])
        if any(sorted(w) != names for w in weights):
            raise ValueError(f"loss_weights must name the same terms for every batch, got {[sorted(w) for w in weights]}")
        sums = torch.tensor([sum(w[n] for w in weights) for n in names], dtype=torch.float64)
        if self.dist.enabled:
            sums = sums.to(self.dist.device) if self.dist.device.type == "cuda" else sums
            torch_dist.all_reduce(sums)
        return {n: float(s) for n, s in zip(names, sums.tolist())}

    def _mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average task metrics over the processes that reported them (keys may differ per process, e.g. per
        embodiment)."""
        gathered: list[dict[str, float]] = [{}] * self.dist.world
        torch_dist.all_gather_object(gathered, metrics)
        keys = sorted({k for m in gathered for k in m})
        return {k: float(np.mean([m[k] for m in gathered if k in m])) for k in keys}

    def _to_device(self, batch):
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, torch.Tensor):
            return batch.to(self.dist.device, non_blocking=True)
        return batch
