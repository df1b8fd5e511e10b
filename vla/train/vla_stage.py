"""Stage 4, `vla train stage=vla`: the robot-data mixture with the action-token loss, optionally co-trained with
scene VQA, on a DeepSeek-VL2 backbone from the previous stage (or an official checkpoint, or a random preset).

    vla train stage=vla init_from=runs/sft/checkpoints/step-00000200 \\
        'stage.data.datasets=[{root: data/nav}, {root: data/arm, weight: 2}]' stage.data.chunk_len=8 \\
        stage.data.vqa_path=runs/sft/data/sft.jsonl stage.data.vqa_ratio=0.2

`stage.data`: `datasets` (LeRobotDataset roots or hub ids with optional `weight` / `embodiment`), `chunk_len` (one
number, or {embodiment: H}), `image_size` (frames are resized to it; default the vision tower's), `action_norm` /
`state_norm` (quantile default), `vqa_path` + `vqa_ratio` (share of samples that are scene conversations),
`cache_frames` (keep decoded frames and processed conversations in memory: later epochs skip decoding).
`stage.options.policy`: VLAPolicyConfig fields (decoding, router_prior, n_action_steps, ...).
A checkpoint of this stage is a policy folder (VLAPolicy.save): `vla eval policy=checkpoint:DIR`, `vla vqa
checkpoint=DIR` and, through lerobot_policy_dsvla.save_policy_for_lerobot, lerobot-eval all read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from envs.mixture import MixtureDataset, SourceSchedule
from heads.embodiment import EmbodimentRegistry
from vla.policy.lora import (ADAPTER_WEIGHTS, apply_lora, is_adapter_checkpoint, load_adapter_weights, load_base_head,
                             make_lora_config, save_adapter, token_row_sources)
from vla.policy import BACKBONE_DIR, POLICY_CONFIG, POLICY_WEIGHTS, VLAPolicy, VLAPolicyConfig
from vla.train.stages import (VL2_GROUPS, LossOutput, ShardedBatches, StageContext, StageTask, StageTaskError,
                              build_vl2_backbone, group_parameters, register_stage_task, vl2_module_group)

HEAD_GROUP = "action_head"


@dataclass
class VLADataConfig:
    datasets: list[Any] = field(default_factory=list)
    chunk_len: int | dict[str, int] = 8
    image_size: int | None = None
    action_norm: str = "quantile"
    state_norm: str = "quantile"
    vqa_path: str | None = None
    vqa_ratio: float = 0.0
    cache_frames: bool = False  # keep decoded frames (uint8) and processed scene conversations in memory


def registry_from_mixture(mixture, chunk_len: int | dict[str, int]) -> EmbodimentRegistry:
    """One registry entry per embodiment of the mixture: the robot as registered, with the cameras and fps of its
    dataset and the chunk length H (per robot name, or one for all; default 8)."""
    registry = EmbodimentRegistry()
    for member in mixture.members:
        robot = member.embodiment
        if robot.name in registry.names():
            continue
        H = chunk_len.get(robot.name, 8) if isinstance(chunk_len, dict) else int(chunk_len)
        cameras = tuple(member.camera_keys[c] for c in sorted(member.camera_keys))
        registry.register(dataclasses.replace(robot, cameras=cameras, fps=member.fps, chunk_len=H))
    return registry


class VLAStageTask(StageTask):
    """The policy as the trainer's module; robot samples (and VQA samples) in one deterministic stream."""

    def __init__(self, ctx: StageContext):
        from backbone.processor import DeepseekVL2Processor

        self.name, self.ctx = ctx.name, ctx
        self.data = VLADataConfig(**ctx.data)
        if not self.data.datasets:
            raise StageTaskError("stage vla needs stage.data.datasets (LeRobotDataset roots or hub ids)")
        self.peft = dict(ctx.peft or {})
        if self.peft.get("method") not in (None, "lora"):
            raise StageTaskError(f"peft.method must be lora or null, got {self.peft['method']!r}")
        if self.peft.get("method") and not ctx.init_from:
            raise StageTaskError("peft.method=lora fine-tunes a trained model: set init_from (a policy checkpoint or "
                                 "an official-format DeepSeek-VL2 folder)")
        # init_from may be a policy checkpoint (a previous vla stage, a merged LoRA): its backbone/ and action head
        policy_init = ctx.init_from and (Path(ctx.init_from) / POLICY_CONFIG).is_file()
        # FSDP2 from the meta device (init_from: an official-format folder or a policy checkpoint): the backbone is
        # built on meta, new vocabulary rows wait for their source rows (`pending_rows`), the trainer reads each
        # process's shards (vla.train.fsdp_load); LoRA's adapters are drawn on the CPU (lora.init_adapters), its token rows
        # start as the rows read.
        meta = bool(ctx.meta_init and ctx.init_from)
        backbone_ctx = dataclasses.replace(ctx, meta_init=meta, init_from=str(Path(ctx.init_from) / BACKBONE_DIR)) \
            if policy_init else dataclasses.replace(ctx, meta_init=meta)
        backbone, tokenizer = build_vl2_backbone(backbone_ctx)
        tile = backbone.config.vision.image_size
        H_max = max(self.data.chunk_len.values()) if isinstance(self.data.chunk_len, dict) else int(self.data.chunk_len)
        policy_cfg = VLAPolicyConfig(**dict(ctx.options.get("policy", {})))
        # grounding first trains on each episode's box: the episodes without one are left out
        self.mixture = MixtureDataset(self.data.datasets, action_horizon=H_max, action_norm=self.data.action_norm,
                                      state_norm=self.data.state_norm, image_size=self.data.image_size or tile,
                                      cache_frames=self.data.cache_frames, grounded_only=policy_cfg.ground_target)
        registry = registry_from_mixture(self.mixture, self.data.chunk_len)
        stats = {emb: self.mixture.normalizer_for(emb).to_dict() for emb in registry.names()}
        self.module = VLAPolicy(policy_cfg, backbone, tokenizer, registry, stats)
        if policy_init and not meta:
            load_base_head(self.module, ctx.init_from)
        self.lora_base = None
        if self.peft.get("method") == "lora":
            config = make_lora_config(self.module, r=int(self.peft.get("r") or 16), alpha=self.peft.get("alpha"),
                                      dropout=float(self.peft.get("dropout") or 0.0),
                                      targets=self.peft.get("target_modules"), experts=bool(self.peft.get("experts")))
            apply_lora(self.module, config, seed=ctx.seed)
            self.lora_base = str(Path(ctx.init_from).resolve())
        self.meta_init = None
        if meta:  # the head (and adapters) as built here, the backbone (and a policy's head file) from init_from
            from vla.train.fsdp_load import snapshot_to_meta

            self._extras = snapshot_to_meta(self.module)
            self.meta_init = self.meta_source(Path(ctx.init_from))
        self.vqa_records = []
        self._vqa_cache: dict[int, Any] = {}
        if self.data.vqa_path and self.data.vqa_ratio > 0:
            from envs.scene_language import load_conversations

            self.vqa_records = load_conversations(self.data.vqa_path)
            self.processor = DeepseekVL2Processor(tokenizer, backbone.config.processor_config(mask_prompt=True))
        # one stream: each dataset by its weight, scene conversations at vqa_ratio, each source in epochs of its own
        vqa_ratio = self.data.vqa_ratio if self.vqa_records else 0.0
        weights = (1.0 - vqa_ratio) * self.mixture.weights / self.mixture.weights.sum()
        self.schedule = SourceSchedule([len(m) for m in self.mixture.members] + [len(self.vqa_records)],
                                       [*weights, vqa_ratio], ctx.seed,
                                       salts=[10 + i for i in range(len(self.mixture.members))] + [3],
                                       names=[m.label for m in self.mixture.members] + [str(self.data.vqa_path)])
        self.ddp_find_unused_parameters = False  # VLAPolicy.forward gives every trainable parameter a gradient

    # ---- data --------------------------------------------------------------------------------------------------
    def sample(self, index: int) -> dict[str, Any]:
        """Global stream position -> a robot sample or (the `vqa_ratio` share) a scene conversation, from
        `self.schedule`. A pure function of the index (resumable, shardable)."""
        source, item = self.schedule(index)
        if source < len(self.mixture.members):
            return self.mixture[int(self.mixture.offsets[source]) + item]
        if item in self._vqa_cache:
            return {"_vqa": self._vqa_cache[item]}
        record = self.vqa_records[item]
        processed = self.processor.process(record.conversation, [str(p) for p in record.images])
        if self.data.cache_frames:
            self._vqa_cache[item] = processed
        return {"_vqa": processed}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        robot = [s for s in samples if "_vqa" not in s]
        vqa = [s["_vqa"] for s in samples if "_vqa" in s]
        batch: dict[str, Any] = torch.utils.data.default_collate(robot) if robot else {}
        if vqa:
            collated = self.processor.collate(vqa)
            collated.pop("seq_lens"), collated.pop("num_image_tokens")
            batch["vqa"] = collated
        return batch

    def batches(self, rank: int, world: int, micro_batch: int) -> ShardedBatches:
        return ShardedBatches(self.sample, self.collate, rank, world, micro_batch)

    # ---- model -------------------------------------------------------------------------------------------------
    def parameter_groups(self):
        if self.lora_base is not None:  # LoRA: peft decided (adapters, added token rows, the head; the rest frozen)
            trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
            return group_parameters(self.module, lambda n: "adapter" if n in trainable else "base",
                                    ("adapter", "base"), ["adapter"], [], {})

        def classify(name: str) -> str:
            return vl2_module_group(name[len("backbone."):]) if name.startswith("backbone.") else HEAD_GROUP
        trainable = list(self.ctx.trainable) + ([HEAD_GROUP] if "all" in self.ctx.trainable else [])
        return group_parameters(self.module, classify, VL2_GROUPS + (HEAD_GROUP,), trainable, self.ctx.frozen, self.ctx.lr_mult)

    def loss_weights(self, batch: dict[str, Any]) -> dict[str, float]:
        return self.module.loss_weights(batch)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        """Every micro-batch, conversations-only ones too, through `model` (the DDP / FSDP2 wrapper)."""
        return model(batch, return_terms=True)

    def attach(self, optimizer: torch.optim.Optimizer):
        return self.module.backbone.language.attach_bias_update(optimizer)

    def set_activation_checkpointing(self, on: bool) -> None:
        self.module.backbone.language.gradient_checkpointing = bool(on)

    def fsdp_units(self) -> list[nn.Module]:
        """The decoder layers, each sharded on its own; every micro-batch then runs them once (`single_pass`), so
        every process issues the same all-gathers whatever its mix of control steps and conversations."""
        self.module.single_pass = True
        return list(self.module.backbone.language.model.layers)

    def describe(self) -> str:
        robots = ", ".join(f"{e.name} (action {e.action_dim}, H={e.chunk_len}, {len(e.cameras)} camera(s), {e.fps} Hz)"
                           for e in self.module.registry)
        vqa = f"; scene VQA co-training at {self.data.vqa_ratio:.0%} ({len(self.vqa_records)} conversations)" if self.vqa_records else ""
        left = "".join(f"; {m.label}: {m.left_out} episode(s) without a box left out" for m in self.mixture.members
                       if m.left_out)
        return f"stage vla: {len(self.mixture)} frames from {len(self.mixture.members)} dataset(s): {robots}{vqa}{left}"

    # ---- weights -----------------------------------------------------------------------------------------------
    def save_weights(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> None:
        if self.lora_base is not None:  # the adapter and the trained extras only (vla merge-lora makes a full one)
            save_adapter(self.module, directory, base=self.lora_base, state_dict=state_dict)
            return
        self.module.save(directory, state_dict=state_dict)

    def meta_source(self, directory: Path):
        """FSDP2 from the meta device: a policy checkpoint's backbone/ (official format) and head file, or an
        official-format folder (the head as built, the added vocabulary rows grown from the folder's rows); a LoRA
        checkpoint (resume): its base as at the start, then the adapter's weights (put on the module by peft, its
        trainable tensors allocated on the CPU for them)."""
        from vla.train.fsdp_load import MetaInit, snapshot_to_meta

        directory = Path(directory)
        if self.lora_base is not None and is_adapter_checkpoint(directory):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            init = self.meta_source(Path(self.lora_base))
            for module in self.module.modules():  # what the adapter file holds: the trainable tensors, on the CPU
                for name, param in list(module.named_parameters(recurse=False)):
                    if param.requires_grad and param.is_meta:
                        setattr(module, name, nn.Parameter(torch.empty_like(param, device="cpu")))
            set_peft_model_state_dict(self.module, load_file(str(directory / ADAPTER_WEIGHTS)), adapter_name="default")
            init.after = snapshot_to_meta(self.module)
            return init
        language = self.module.backbone.language
        grow = {f"backbone.language.{name}": rows for name, rows in language.pending_rows.items()}
        if (directory / POLICY_CONFIG).is_file():
            folders, files = [("backbone.", directory / BACKBONE_DIR)], [("", directory / POLICY_WEIGHTS)]
        else:
            folders, files = [("backbone.", directory)], []
        return MetaInit(folders=folders, files=files, extras=dict(getattr(self, "_extras", {})),
                        num_experts=language.config.n_routed_experts, grow=grow,
                        derive=token_row_sources(self.module) if self.lora_base is not None else {})

    def load_weights(self, directory: Path) -> None:
        if self.lora_base is not None:
            load_adapter_weights(self.module, directory)
            return
        loaded = VLAPolicy.load(directory)
        self.module.load_state_dict(loaded.state_dict())


register_stage_task("vla", VLAStageTask)
