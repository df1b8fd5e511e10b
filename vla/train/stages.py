"""Stage tasks: what one training stage optimizes, on which data, with which loss.

The trainer (vla/train/trainer.py) is generic; everything stage-specific lives in a *stage task*, a subclass of
`StageTask` (below): it declares every hook the trainer calls, the optional ones with no-op defaults, and `loss`
returns a `LossOutput` (the terms, the logged scalars, the tokens the step processed).

Stage tasks are made by factories registered by name: `register_stage_task(name, factory)`, with
`factory(ctx: StageContext) -> task`. `align`, `pretrain` and `sft` (the DeepSeek-VL2 recipe, docs/architecture.md,
"Training recipe (the stages)") are built in here; `vla` is registered by `vla.train.vla_stage`, imported on demand.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class ModuleGroup:
    """Parameters of one named part of the model (vision tower, experts, ...) with its training settings."""

    name: str
    params: list[tuple[str, nn.Parameter]]
    trainable: bool = True
    lr_mult: float = 1.0

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


class BatchIterator(Protocol):
    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def __next__(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class LossOutput:
    """What `StageTask.loss` returns for one micro-batch.

    terms: {term: scalar tensor}, each a mean over its own units (`StageTask.loss_weights` counts them); the loss is
        their sum. A task with one term names it `loss`.
    metrics: scalars to log (`loss/<embodiment>` keys are logged per embodiment, `router/*`, ...).
    tokens: sequence tokens the micro-batch ran (throughput); None = the batch's `attention_mask` sum, or the number
        of samples where it has none."""

    terms: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: float | None = None


class StageTask:
    """What one training stage optimizes, as the trainer sees it. A subclass sets `name` and `module` (what the
    optimizer updates; the trainer wraps it in DDP or shards it with FSDP2) and implements the five methods that
    raise here; every other hook has a no-op default."""

    name: str
    module: nn.Module
    ddp_find_unused_parameters: bool = True  # False when every trainable parameter gets a gradient on every batch
    meta_init: Any = None  # a vla.train.fsdp_load.MetaInit when built on the meta device (the trainer reads the shards)

    # ---- required ----------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[ModuleGroup]:
        """Named groups of `module`'s parameters: the freezing plan and the per-group lr multipliers."""
        raise NotImplementedError(f"{type(self).__name__}.parameter_groups")

    def batches(self, rank: int, world: int, micro_batch: int) -> BatchIterator:
        """This process's micro-batches; `state_dict()` / `load_state_dict()` give a rank-independent position
        (saved in checkpoints, so a run resumes on the next unseen sample, with any process count)."""
        raise NotImplementedError(f"{type(self).__name__}.batches")

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        """`model` is `module` as the trainer runs it (a DDP wrapper, or the sharded module): call it, not
        `self.module`."""
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def save_weights(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """Write the weights (a full, unsharded state dict of `module`, on CPU) plus tokenizer, config, normalizer
        stats, ...: whatever a later stage or an inference command needs from the folder."""
        raise NotImplementedError(f"{type(self).__name__}.save_weights")

    def load_weights(self, directory: Path) -> None:
        """Read what `save_weights` wrote into `module` (resume)."""
        raise NotImplementedError(f"{type(self).__name__}.load_weights")

    # ---- optional (no-op defaults) -----------------------------------------------------------------------------
    def loss_weights(self, batch: dict[str, Any]) -> dict[str, float] | None:
        """Units each term of `loss` averages over in `batch` (tokens, sequences, ...): the trainer then makes every
        term a mean over the global step, the same loss whatever the process count / accumulation. None: every
        micro-batch weighs the same."""
        return None

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Hook into the optimizer (e.g. the noaux_tc expert-bias update as a step hook)."""
        return None

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute activations in backward (`activation_checkpointing=true`); tasks without it ignore the flag."""

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules to shard one by one with FSDP2 (the root is sharded last)."""
        return []

    def describe(self) -> str | None:
        """One line printed at the start of the run."""
        return None

    def meta_source(self, directory: Path) -> Any:
        """The MetaInit that reads a checkpoint of this stage shard by shard (resume under FSDP2 from meta)."""
        raise StageTaskError(f"stage {self.name} cannot resume under FSDP2 from the meta device")


@dataclass
class StageContext:
    """Everything a stage factory gets (plain values; hydra stays at the entry point)."""

    name: str
    out_dir: Path
    seed: int = 0
    init_from: str | None = None  # previous stage's checkpoint or an official-format folder; None = random init
    model_preset: str = "test"
    model_language: dict[str, Any] = field(default_factory=dict)  # language-config overrides of the preset
    model_vision: dict[str, Any] = field(default_factory=dict)  # vision-tower overrides of the preset
    model_center_image_tokens: bool | None = None  # the preset's centring of image tokens overridden (None = keep)
    tokenizer: str | None = None  # folder with tokenizer.json (default: init_from's, else a built BPE)
    tokenizer_vocab: int = 512
    trainable: list[str] = field(default_factory=lambda: ["all"])
    frozen: list[str] = field(default_factory=list)
    lr_mult: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # free-form, for registered (third-party) stage tasks
    peft: dict[str, Any] = field(default_factory=dict)  # {method: lora, r, alpha, dropout, target_modules} (stage vla)
    meta_init: bool = False  # FSDP2 under torchrun: build on meta, the trainer loads each process's shards (init_from)
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None  # synchronizes processes (data generated by rank 0)


class StageTaskError(RuntimeError):
    """A stage cannot be built (unknown name, no registered factory, bad data)."""


_FACTORIES: dict[str, Callable[[StageContext], Any]] = {}
# Modules imported on demand to find a factory that is not registered yet.
_PROVIDERS: dict[str, str] = {"vla": "vla.train.vla_stage", "vision": "vla.train.vision_stage"}


def register_stage_task(name: str, factory: Callable[[StageContext], Any]) -> None:
    """Make `vla train stage=<name>` build its task with `factory(ctx)` (a later registration replaces one)."""
    _FACTORIES[name] = factory


def registered_stage_tasks() -> list[str]:
    return sorted(_FACTORIES)


def make_stage_task(ctx: StageContext):
    """Build the task for `ctx.name`, importing its provider module (e.g. `vla.policy` for `vla`) if needed."""
    if ctx.name not in _FACTORIES and ctx.name in _PROVIDERS:
        import importlib

        try:
            importlib.import_module(_PROVIDERS[ctx.name])
        except ModuleNotFoundError as e:
            raise StageTaskError(
                f"stage {ctx.name!r} has no registered task: importing {_PROVIDERS[ctx.name]!r} failed ({e}); the "
                f"policy code must call vla.train.stages.register_stage_task({ctx.name!r}, factory) (or pass "
                f"import_modules=[module] that does)") from e
    if ctx.name not in _FACTORIES:
        raise StageTaskError(
            f"stage {ctx.name!r} has no registered task (registered: {', '.join(registered_stage_tasks())}); "
            f"call vla.train.stages.register_stage_task({ctx.name!r}, factory) in a module listed in import_modules")
    return _FACTORIES[ctx.name](ctx)


# ------------------------------------------------------------------------------------------------------------------
# Freezing plan
# ------------------------------------------------------------------------------------------------------------------

VL2_GROUPS = ("vision_tower", "projector", "embed", "attention", "norms", "dense_mlp", "router", "experts",
              "shared_experts", "lm_head")
GROUP_ALIASES = {
    "all": VL2_GROUPS,
    "vision": ("vision_tower", "projector"),
    "language": ("embed", "attention", "norms", "dense_mlp", "router", "experts", "shared_experts", "lm_head"),
    "moe": ("router", "experts", "shared_experts"),
}


def vl2_module_group(name: str) -> str:
    """The module group of a DeepseekVL2 parameter name (the unit of freezing and learning-rate multipliers)."""
    if name.startswith("vision_encoder.vision."):
        return "vision_tower"
    if name.startswith("vision_encoder."):
        return "projector"  # the adaptor MLP plus image_newline / view_seperator
    if "embed_tokens" in name:
        return "embed"
    if "lm_head" in name:
        return "lm_head"
    if ".self_attn." in name:
        return "attention" if "layernorm" not in name.rsplit(".", 2)[-2] else "norms"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp." in name:
        return "dense_mlp"
    return "norms"


def expand_groups(names: list[str], known: tuple[str, ...]) -> set[str]:
    """Group names with aliases (`all`, `vision`, `language`, `moe`) expanded; unknown names are an error."""
    out: set[str] = set()
    for name in names:
        if name == "all":
            out |= set(known)
        elif name in GROUP_ALIASES:
            out |= set(GROUP_ALIASES[name]) & set(known)
        elif name in known:
            out.add(name)
        else:
            raise ValueError(f"unknown module group {name!r}; known: {', '.join(known)} (aliases: {', '.join(GROUP_ALIASES)})")
    return out


def group_parameters(module: nn.Module, classify: Callable[[str], str], known: tuple[str, ...], trainable: list[str],
                     frozen: list[str], lr_mult: dict[str, float]) -> list[ModuleGroup]:
    """Split `module`'s parameters into named groups: trainable = `trainable` minus `frozen`; lr multipliers by group
    (aliases allowed as keys: `vision: 0.1` applies to the tower and the projector)."""
    train_set = expand_groups(trainable, known) - expand_groups(frozen, known)
    mults: dict[str, float] = {}
    for key, value in lr_mult.items():
        for g in expand_groups([key], known):
            mults[g] = float(value)
    groups = {name: ModuleGroup(name, [], name in train_set, mults.get(name, 1.0)) for name in known}
    for pname, p in module.named_parameters():
        group = classify(pname)
        if group not in groups:
            raise ValueError(f"parameter {pname} classified into unknown group {group!r}")
        groups[group].params.append((pname, p))
    return [g for g in groups.values() if g.params]


def apply_freezing(groups: list[ModuleGroup]) -> None:
    """requires_grad = the group's `trainable` for every parameter (frozen ones get no gradient, no optimizer state)."""
    for g in groups:
        for _, p in g.params:
            p.requires_grad_(g.trainable)


def format_freezing_plan(groups: list[ModuleGroup]) -> str:
    """A table: group, trainable / total parameters, lr multiplier."""
    rows = [("group", "trainable", "total", "lr x")]
    for g in groups:
        rows.append((g.name, f"{g.numel if g.trainable else 0:,}", f"{g.numel:,}", f"{g.lr_mult:g}" if g.trainable else "frozen"))
    total = sum(g.numel for g in groups)
    train = sum(g.numel for g in groups if g.trainable)
    rows.append(("TOTAL", f"{train:,}", f"{total:,}", f"{100 * train / max(total, 1):.1f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Resumable, sharded sample streams
# ------------------------------------------------------------------------------------------------------------------


class ShardedBatches:
    """Micro-batches of a deterministic global sample stream, sharded over processes.

    Round k covers global samples [k*W*b, (k+1)*W*b) (W processes, b = micro-batch); process r takes the r-th slice of b.
    So one process with micro-batch W*b sees exactly the samples that W processes with micro-batch b see together,
    and the position (`next_index`, a global sample count) means the same for any process count.
    """

    def __init__(self, sample: Callable[[int], dict[str, Any]], collate: Callable[[list], dict[str, Any]],
                 rank: int, world: int, micro_batch: int):
        self.sample, self.collate = sample, collate
        self.rank, self.world, self.micro_batch = rank, world, micro_batch
        self.next_index = 0

    def __iter__(self) -> "ShardedBatches":
        return self

    @property
    def round_size(self) -> int:
        return self.world * self.micro_batch

    def batch_at(self, next_index: int) -> dict[str, Any]:
        """This process's micro-batch of the round starting at global position `next_index`."""
        start = next_index + self.rank * self.micro_batch
        return self.collate([self.sample(i) for i in range(start, start + self.micro_batch)])

    def __next__(self) -> dict[str, Any]:
        batch = self.batch_at(self.next_index)
        self.next_index += self.round_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_index = int(state["next_index"])


class _Rounds(torch.utils.data.Dataset):
    """The k-th round after global position `start` of a ShardedBatches stream, for DataLoader workers."""

    def __init__(self, stream: ShardedBatches, start: int):
        self.stream, self.start = stream, start

    def __getitem__(self, k: int) -> dict[str, Any]:
        return self.stream.batch_at(self.start + k * self.stream.round_size)


def _leave_stops_to_the_trainer(worker_id: int) -> None:
    """A data worker ignores Ctrl-C and SIGTERM (a terminal and a scheduler send them to every process): the trainer
    finishes its step and checkpoints with the batches it was handed; the workers end with it."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


class PrefetchedBatches:
    """A ShardedBatches stream drawn ahead by `workers` processes (a torch DataLoader over its rounds, `prefetch`
    micro-batches each), so that sampling and collating overlap the training step: the same batches in the same order
    (samples are pure functions of their index), and `state_dict()` counts only the batches handed out, so a resumed
    run continues exactly where the checkpoint was taken. `pin_memory` for fast host-to-GPU copies."""

    def __init__(self, stream: ShardedBatches, workers: int, prefetch: int = 2, pin_memory: bool = False):
        if workers < 1:
            raise ValueError(f"data workers must be >= 1, got {workers}")
        if "fork" not in multiprocessing.get_all_start_methods():  # workers inherit the stream (and its model) as is
            raise ValueError(f"data_workers needs the 'fork' start method, which this platform lacks "
                             f"({multiprocessing.get_all_start_methods()}): set data_workers=0")
        self.stream, self.workers, self.prefetch, self.pin_memory = stream, workers, prefetch, pin_memory
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> "PrefetchedBatches":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(torch.utils.data.DataLoader(
                _Rounds(self.stream, self.stream.next_index), batch_size=None, sampler=itertools.count(),
                num_workers=self.workers, prefetch_factor=self.prefetch, pin_memory=self.pin_memory,
                multiprocessing_context="fork", worker_init_fn=_leave_stops_to_the_trainer))
        batch = next(self._it)
        self.stream.next_index += self.stream.round_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self.close()  # the workers drew from the old position

    def close(self) -> None:
        """Stop the workers (they also stop when this object is garbage-collected)."""
        self._it = None


# ------------------------------------------------------------------------------------------------------------------
# DeepSeek-VL2 stages: align, pretrain, sft
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class VLDataConfig:
    """Data of the vision-language stages (`stage.data` in the config)."""

    path: str | list[str] | None = None  # JSONL conversation file(s) (envs/scene_language format); None = generate
    generate: int = 256  # records of scene-language data generated into <out>/data when path is None
    generate_stage: str | None = None  # which generator stage (default: the stage's own name)
    image_size: int = 64  # generated images (square)
    text_path: str | None = None  # text-only documents (.txt one per line, or .jsonl with "text"); None = answers
    text_ratio: float = 0.0  # fraction of text-only samples (pretrain: 0.3)
    mask_prompt: bool = True  # loss only on assistant answers + EOS (sft); False: every text token


VL_STAGE_DEFAULTS = {
    # stage: (trainable groups, generator stage, text ratio, mask_prompt)
    "align": dict(generate_stage="align", text_ratio=0.0, mask_prompt=True),
    "pretrain": dict(generate_stage="pretrain", text_ratio=0.3, mask_prompt=False),
    "sft": dict(generate_stage="sft", text_ratio=0.0, mask_prompt=True),
}


def build_vl2_backbone(ctx: StageContext):
    """(model, tokenizer) for a VL stage: from `init_from` (a previous stage's checkpoint or an official-format
    folder; its tokenizer unless `ctx.tokenizer` is given) or a random init of the preset."""
    from backbone.deepseek_vl2 import build_deepseek_vl2, deepseek_vl2_preset, load_deepseek_vl2, replace_language
    from backbone.tokenizer import build_bpe_tokenizer, load_tokenizer

    tok_dir = ctx.tokenizer
    if tok_dir is None and ctx.init_from and (Path(ctx.init_from) / "tokenizer.json").is_file():
        tok_dir = ctx.init_from
    tokenizer = load_tokenizer(tok_dir) if tok_dir else build_bpe_tokenizer(vocab_size=ctx.tokenizer_vocab)
    if ctx.init_from:
        if ctx.meta_init:  # weights come later, shard by shard (vla.train.fsdp_load)
            from backbone.checkpoint import read_config
            from backbone.deepseek_vl2 import DeepseekVL2Config

            model = build_deepseek_vl2(DeepseekVL2Config.from_official(read_config(ctx.init_from)), device="meta")
        else:
            model = load_deepseek_vl2(ctx.init_from)
        if len(tokenizer) > model.config.language.vocab_size:
            raise StageTaskError(f"{ctx.init_from}: tokenizer has {len(tokenizer)} tokens, the model only "
                                 f"{model.config.language.vocab_size}")
        centred = ctx.model_center_image_tokens
        if centred is not None and bool(centred) != model.config.center_image_tokens:
            raise StageTaskError(f"model.center_image_tokens={centred} but {ctx.init_from} was made with "
                                 f"{model.config.center_image_tokens}; it only sets a random init's")
    else:
        config = deepseek_vl2_preset(ctx.model_preset, vision=ctx.model_vision, **ctx.model_language)
        if ctx.model_center_image_tokens is not None:
            config = replace(config, center_image_tokens=bool(ctx.model_center_image_tokens))
        if len(tokenizer) > config.language.vocab_size or "vocab_size" not in ctx.model_language:
            config = replace_language(config, vocab_size=max(len(tokenizer), ctx.model_language.get("vocab_size", 0)))
        model = build_deepseek_vl2(config)
    return model, tokenizer


def data_paths(path: str | list[str]) -> list[Path]:
    """A stage's `data.path`: one JSONL file or a list of them."""
    return [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]


def _read_texts(path: str) -> list[str]:
    p = Path(path)
    if p.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in p.read_text().splitlines() if line.strip()]
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


class VL2StageTask(StageTask):
    """align / pretrain / sft on DeepSeek-VL2: next-token loss on text tokens + the MoE balance loss.

    Samples: conversations (JSONL with images) through the processor; in pretrain a `text_ratio` share of plain
    text documents (BOS + text + EOS, every token supervised, no image). Labels are -100 on image positions, padding
    and (mask_prompt) everything but the assistant answers and their EOS.
    """

    def __init__(self, ctx: StageContext):
        from backbone.processor import DeepseekVL2Processor
        from envs.mixture import SourceSchedule
        from envs.scene_language import load_conversations

        self.name, self.ctx = ctx.name, ctx
        if ctx.peft.get("method"):
            raise StageTaskError(f"peft.method={ctx.peft['method']} is supported for stage=vla only (stage "
                                 f"{ctx.name} trains the backbone in full or by module groups: stage.trainable)")
        data = dict(VL_STAGE_DEFAULTS.get(ctx.name, {})) | dict(ctx.data)
        self.data = VLDataConfig(**data)
        self.module, self.tokenizer = build_vl2_backbone(ctx)
        self.meta_init = None
        if ctx.meta_init and ctx.init_from:
            from vla.train.fsdp_load import MetaInit

            self.meta_init = MetaInit(folders=[("", Path(ctx.init_from))],
                                      num_experts=self.module.config.language.n_routed_experts)
        self.processor = DeepseekVL2Processor(self.tokenizer, self.module.config.processor_config(mask_prompt=self.data.mask_prompt))
        self.records = [r for path in self._data_paths() for r in load_conversations(path)]
        self.texts = _read_texts(self.data.text_path) if self.data.text_path else \
            [a for r in self.records for a in r.answers if a.strip()]
        if self.data.text_ratio > 0 and not self.texts:
            raise StageTaskError("text_ratio > 0 but there are no text-only documents")
        # conversations and (text_ratio) text documents, each in epochs of its own
        ratio = self.data.text_ratio if self.texts else 0.0
        self._schedule = SourceSchedule([len(self.records), len(self.texts)], [1.0 - ratio, ratio], ctx.seed,
                                        salts=[1, 2], names=["conversations", "text documents"])
        # Every parameter takes part in every step (see _keep_vision_in_graph): DDP need not search for unused ones.
        self.ddp_find_unused_parameters = False
        self.module.register_forward_hook(_keep_vision_in_graph, with_kwargs=True)

    # ---- data --------------------------------------------------------------------------------------------------
    def _data_paths(self) -> list[Path]:
        if self.data.path:
            return data_paths(self.data.path)
        from envs.scene_language import generate_scene_language

        stage = self.data.generate_stage or self.name
        out = self.ctx.out_dir / "data"
        path = out / f"{stage}.jsonl"
        marker = out / f"{stage}.done.json"
        spec = {"count": self.data.generate, "seed": self.ctx.seed, "image_size": self.data.image_size}
        if self.ctx.rank == 0 and not (marker.is_file() and json.loads(marker.read_text()) == spec):
            generate_scene_language(out, stage, self.data.generate, seed=self.ctx.seed, image_size=self.data.image_size)
            marker.write_text(json.dumps(spec))
        self.ctx.barrier()
        return [path]

    def sample(self, index: int) -> dict[str, Any]:
        """The processed sample at global stream position `index` (a pure function of the index)."""
        source, item = self._schedule(index)
        if source == 1:
            return self._text_sample(self.texts[item])
        record = self.records[item]
        return self.processor.process(record.conversation, [str(p) for p in record.images])

    def _text_sample(self, text: str) -> dict[str, Any]:
        tok, tile = self.tokenizer, self.processor.config.tile_size
        ids = torch.tensor([tok.bos_id] + tok.encode(text)[: self.processor.config.max_length - 2] + [tok.eos_id])
        return {"input_ids": ids, "labels": ids.clone(), "images_seq_mask": torch.zeros(len(ids), dtype=torch.bool),
                "images": torch.zeros(1, 3, tile, tile), "images_spatial_crop": torch.zeros(1, 2, dtype=torch.long),
                "num_image_tokens": []}

    def batches(self, rank: int, world: int, micro_batch: int) -> ShardedBatches:
        return ShardedBatches(self.sample, self._collate, rank, world, micro_batch)

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor.collate(samples)
        batch.pop("seq_lens"), batch.pop("num_image_tokens")
        return batch

    # ---- model -------------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[ModuleGroup]:
        return group_parameters(self.module, vl2_module_group, VL2_GROUPS, self.ctx.trainable, self.ctx.frozen,
                                self.ctx.lr_mult)

    def loss_weights(self, batch: dict[str, Any]) -> dict[str, float]:
        cfg = self.module.config.language
        weights = {"lm": float((shifted_targets(batch) != -100).sum())}
        if self.module.training and cfg.aux_loss_alpha > 0 and cfg.scoring_func == "softmax":
            weights["aux"] = float(batch["input_ids"].shape[0] if cfg.seq_aux else batch["attention_mask"].sum())
        return weights

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        out = model(**batch, return_router=True)
        terms = {"lm": next_token_loss(out.logits, batch)}
        if out.aux_loss is not None:
            terms["aux"] = out.aux_loss
        return LossOutput(terms, {"router/load_entropy": expert_load_entropy(out.router, batch["attention_mask"])})

    def attach(self, optimizer: torch.optim.Optimizer):
        return self.module.language.attach_bias_update(optimizer)

    def set_activation_checkpointing(self, on: bool) -> None:
        self.module.language.gradient_checkpointing = bool(on)

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules sharded on their own (the rest is sharded with the root). Only the decoder layers: every
        process runs them on every batch, in the same order. The vision encoder stays in the root group: a process
        whose micro-batch is text-only skips it, and a separately sharded unit would then issue its all-gather on
        some processes only (a hang)."""
        return list(self.module.language.model.layers)

    def describe(self) -> str:
        n_text = sum(1 for _ in self.texts) if self.data.text_ratio > 0 else 0
        return (f"stage {self.name}: {len(self.records)} conversations"
                + (f" + {n_text} text-only documents at {self.data.text_ratio:.0%}" if n_text else "")
                + f"; loss on {'answers + EOS' if self.data.mask_prompt else 'all text tokens'}")

    # ---- weights -----------------------------------------------------------------------------------------------
    def save_weights(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """Official-format DeepSeek-VL2 folder (config.json + safetensors, `load_deepseek_vl2` reads it) + tokenizer."""
        from backbone.checkpoint import write_checkpoint
        from backbone.convert import deepseek_vl2_to_official

        write_checkpoint(directory, self.module.config.to_official(), deepseek_vl2_to_official(state_dict))
        self.tokenizer.save(directory)

    def meta_source(self, directory: Path):
        """Resume under FSDP2 from the meta device: the checkpoint folder is official format."""
        from vla.train.fsdp_load import MetaInit

        return MetaInit(folders=[("", Path(directory))], num_experts=self.module.config.language.n_routed_experts)

    def load_weights(self, directory: Path) -> None:
        from backbone.checkpoint import load_into, read_safetensors
        from backbone.convert import deepseek_vl2_from_official

        state = deepseek_vl2_from_official(read_safetensors(directory), self.module.config.language.n_routed_experts)
        load_into(self.module, state, str(directory))
        self.module.vision_encoder.reset_buffers()


def _keep_vision_in_graph(module: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook: on a text-only training batch (the vision tower is skipped), the vision parameters still get a
    gradient (zeros; `gradients_for_all`)."""
    crop = kwargs.get("images_spatial_crop")
    if not module.training or (crop is not None and int(crop.sum()) > 0) or output.logits is None:
        return output
    output.logits = gradients_for_all(output.logits, [p for p in module.vision_encoder.parameters() if p.requires_grad])
    return output


def gradients_for_all(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """`loss` (or any tensor the loss is computed from), arranged so that every one of `params` has a gradient once
    the backward pass through it ends: zeros where the batch did not use it (another robot's state projection, the
    vision tower on a text-only batch). Every process then reduces the same parameters (FSDP2 reduce-scatters only
    those with a gradient; DDP needs no unused-parameter search), and AdamW updates them alike with 1 or N
    processes. In a process group the zeros come from the graph (`loss + 0 x the parameters' sum`: the reducers see
    them); in one process, the parameters still without a gradient when the backward pass ends get zeros, the same
    values without three autograd ops a parameter (on a GPU, kernel launches)."""
    if not loss.requires_grad or not params:
        return loss
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return loss + 0.0 * torch.stack([p.sum() for p in params]).sum()

    def fill_unused() -> None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def at_backward(grad: torch.Tensor) -> torch.Tensor:  # runs as the backward pass reaches `loss`
        torch.autograd.Variable._execution_engine.queue_callback(fill_unused)  # runs when that pass ends
        return grad

    loss.register_hook(at_backward)
    return loss


def next_token_loss(logits_BTV: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The language loss of every stage (and of VQA co-training): cross-entropy of the next token, a mean over this
    batch's supervised targets (`shifted_targets`; 0 when there are none: the term then has weight 0)."""
    labels = shifted_targets(batch)
    logits = logits_BTV[:, :-1]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def shifted_targets(batch: dict[str, Any]) -> torch.Tensor:
    """Next-token targets (B, T-1): labels[:, 1:], -100 where the predicting position is padding.

    The processor keeps BOS in the labels; with left padding BOS sits after a pad token, which must not be trained
    to predict it (and the loss would then depend on how much a sample is padded)."""
    labels = batch["labels"][:, 1:]
    return labels.masked_fill(~batch["attention_mask"][:, :-1].bool(), -100)


def expert_load_entropy(routes: list, attention_mask: torch.Tensor) -> float:
    """Mean over MoE layers of the entropy of the expert load (share of routed real tokens per expert), divided by
    log(E): 1 = perfectly balanced, 0 = every token to one expert. NaN without MoE layers."""
    mask = attention_mask.reshape(-1).bool()
    values = []
    with torch.no_grad():
        for route in routes:
            if route is None:
                continue
            E = route.scores_TE.shape[-1]
            counts = torch.bincount(route.expert_ids_TK[mask].reshape(-1), minlength=E).float()
            p = counts / counts.sum().clamp(min=1)
            values.append(float(-(p * p.clamp(min=1e-12).log()).sum() / math.log(E)))
    return float(np.mean(values)) if values else float("nan")


for _stage in ("align", "pretrain", "sft"):
    register_stage_task(_stage, VL2StageTask)
