"""The multi-embodiment VLA policy: DeepSeek-VL2 + action tokens.

One control step is one sequence through the unchanged DeepSeek-VL2 backbone:

    [BOS] <|User|>: [camera 1 image tokens] [camera 2 ...] \\n{instruction} <|emb:ROBOT|> [state] \\n\\n<|Assistant|>:
    [H*A action positions]

so action tokens flow through the same MoE layers (and experts) as text and image tokens. Robots differ in their
action size, chunk length, cameras and rate; each emits its own H*A action positions. See heads/action_head.py for
the parallel / autoregressive decoding, the offset head, the state token and the router prior.
With `instruction_first` the instruction comes before the images (`<|User|>: {instruction}\\n [images] <|emb:ROBOT|>
...`), so the image tokens see which object it names. With `ground_target` the answer first says where the named
object is (`<|Assistant|>: <|ref|>the red triangle<|/ref|><|det|>[[x1,y1,x2,y2]]<|/det|> [actions]`: teacher-forced
in training, generated at inference), and with `target_token` one more position carries that box as numbers.

The policy works in normalized units: states and actions are normalized per dataset (quantile q01/q99 -> [-1, 1] by
default) before they reach it, by the mixture loader in training, by `EnvPolicy` in our rollouts and by lerobot's
processors in `lerobot-eval`; the normalizer stats are saved beside the weights. Inside, each action dimension in
[-1, 1] maps to one of `n_bins` uniform bins (heads.ActionTokenizer: it only bins).

Batch keys (lerobot conventions): `observation.images.<camera>` (B, 3, H, W) float in [0, 1], `observation.state`
(B, S) normalized (zero-padded past a robot's size), `task` list[str], `embodiment` list[str] (or one str), and for
training `action` (B, H, A_max) normalized and `action_is_pad` (B, H). Optional `vqa` (a processor batch of scene
conversations) adds the language-model loss for co-training.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from backbone.checkpoint import checkpoint_folder, read_json_file, read_safetensors_file, write_checkpoint
from backbone.convert import deepseek_vl2_to_official
from backbone.deepseek_vl2 import DeepseekVL2, build_deepseek_vl2, deepseek_vl2_preset, load_deepseek_vl2
from backbone.generate import compile_decoder, generate
from backbone.grounding import parse_grounding
from backbone.tokenizer import Tokenizer, load_tokenizer
from backbone.vision import layout_global_view, layout_image_tokens
from heads.action_head import ActionQueries, BoxProjection, OffsetHead, RouterPrior, StateProjection, action_losses
from heads.action_tokenizer import ActionTokenizer
from heads.embodiment import Embodiment, EmbodimentRegistry, camera_key
from vla.policy.checkpoint import BACKBONE_DIR, POLICY_CONFIG, POLICY_WEIGHTS
from vla.policy.lora import head_rows, is_adapter_checkpoint, load_adapter_policy, merge_lora
from vla.train.stages import LossOutput, gradients_for_all, next_token_loss, shifted_targets

TEXT, IMAGE, STATE, ACTION, PAD = 0, 1, 2, 3, -1
KIND_NAMES = {TEXT: "text", IMAGE: "image", STATE: "state", ACTION: "action", PAD: "pad"}


@dataclass
class VLAPolicyConfig:
    decoding: str = "parallel"  # "parallel" | "autoregressive"
    n_bins: int = 256
    target_sigma_bins: float = 2.0  # Gaussian soft bin targets (0 = plain one-hot cross-entropy)
    continuous_offset: bool = True  # predict the offset inside the bin (L1); off = bin centres
    offset_loss_weight: float = 1.0
    global_view_only: bool = True  # a frame costs h*(h+1) tokens (210 at 384 px) instead of 421
    n_action_steps: int | None = None  # actions served from a chunk before re-planning (None = the whole chunk)
    temporal_ensemble_coeff: float | None = None  # ACT-style ensembling of overlapping chunks (re-plans every step)
    router_prior: bool = False  # learned per-embodiment bias on the router logits of action tokens
    max_chunk_len: int = 64
    max_action_dim: int = 32
    vqa_loss_weight: float = 1.0  # co-training weight of the scene-VQA language loss
    # loss weight of a chunk's steps past its episode's end, whose targets are the robot's hold action (zeros for
    # velocity control: "stop there"); 0 = not trained (lerobot's action_is_pad masking)
    pad_loss_weight: float = 0.0
    # training only: {camera: p} shows that camera as a black frame in a share p of the control steps (camera
    # dropout, so that the others are read too); short names (`top`) or keys (`observation.images.top`)
    camera_dropout: dict[str, float] = field(default_factory=dict)
    # the instruction before the camera images instead of after them: the image tokens then see which object is
    # meant (a causal model's image tokens otherwise cannot), at no cost in tokens
    instruction_first: bool = False
    # the answer says where the instruction's object is before the action positions ("ground, then act"):
    # `<|Assistant|>: <|ref|>the red triangle<|/ref|><|det|>[[x1,y1,x2,y2]]<|/det|> [actions]`, DeepSeek-VL2's grounding
    # answer in the first camera's frame; trained on the box the dataset records (batch key `grounding`, next-token
    # loss x ground_loss_weight), generated greedily at inference (`last_grounding` keeps it), so the actions read the
    # box the language model finds for the instruction instead of learning to bind words to objects themselves
    ground_target: bool = False
    ground_loss_weight: float = 1.0
    max_grounding_tokens: int = 48
    # with ground_target, one more position after the answer: its box as numbers (heads.BoxProjection), so that the
    # action positions can subtract the end effector's position (in the state) from the target's
    target_token: bool = False

    def __post_init__(self) -> None:
        if self.decoding not in ("parallel", "autoregressive"):
            raise ValueError(f"decoding must be 'parallel' or 'autoregressive', got {self.decoding!r}")
        if self.ground_target and self.decoding != "parallel":
            raise ValueError("ground_target needs decoding='parallel'")
        if self.target_token and not self.ground_target:
            raise ValueError("target_token reads the grounding answer: it needs ground_target")
        if not self.pad_loss_weight >= 0:
            raise ValueError(f"pad_loss_weight must be >= 0, got {self.pad_loss_weight!r}")
        self.camera_dropout = {camera_key(c): float(p) for c, p in dict(self.camera_dropout).items()}
        if not all(0 <= p < 1 for p in self.camera_dropout.values()):
            raise ValueError(f"camera_dropout shares must be in [0, 1), got {self.camera_dropout}")


@dataclass
class SequenceBatch:
    """The assembled model inputs of one batch of control steps (left padded)."""

    inputs_embeds: torch.Tensor  # (B, T, D)
    attention_mask: torch.Tensor  # (B, T) bool
    kinds: torch.Tensor  # (B, T) TEXT / IMAGE / STATE / ACTION / PAD
    block_ids: torch.Tensor | None  # (B, T) 0 on action positions (parallel decoding), -1 elsewhere
    embodiment_index: torch.Tensor  # (B, T) registry index on action positions, -1 elsewhere
    action_start: list[int] = field(default_factory=list)  # per sample, first action position
    num_actions: list[int] = field(default_factory=list)  # per sample, H*A
    ground_start: list[int] = field(default_factory=list)  # per sample, first grounding-answer position (ground_target)
    num_ground: list[int] = field(default_factory=list)  # per sample, its grounding tokens


class VLAPolicy(nn.Module):
    def __init__(self, config: VLAPolicyConfig, backbone: DeepseekVL2, tokenizer: Tokenizer,
                 registry: EmbodimentRegistry, normalizer_stats: dict[str, Any] | None = None):
        super().__init__()
        self.config, self.backbone, self.tokenizer, self.registry = config, backbone, tokenizer, registry
        self.normalizer_stats = normalizer_stats or {}  # per embodiment: {"action": {...}, "observation.state": {...}}
        for emb in registry:
            if emb.chunk_len > config.max_chunk_len or emb.action_dim > config.max_action_dim:
                raise ValueError(f"embodiment {emb.name!r} needs a {emb.chunk_len}x{emb.action_dim} chunk; raise "
                                 f"max_chunk_len/max_action_dim ({config.max_chunk_len}x{config.max_action_dim})")
        # vocabulary: embodiment tokens and action bins become real tokens (embedding + LM-head rows)
        new_ids = tokenizer.add_tokens(registry.special_tokens(config.n_bins))
        language = backbone.language
        if len(tokenizer) > language.config.vocab_size or any(i >= language.config.vocab_size for i in new_ids):
            language.resize_vocabulary(max(len(tokenizer), language.config.vocab_size), init_ids=new_ids)
        self.action_token_ids: torch.Tensor
        self.register_buffer("action_token_ids", torch.tensor(
            [tokenizer.token_id(f"<|act_{i}|>") for i in range(config.n_bins)]), persistent=False)
        self.embodiment_token_id = {emb.name: tokenizer.token_id(emb.token) for emb in registry}
        width = language.config.hidden_size
        self.queries = ActionQueries(config.max_chunk_len, config.max_action_dim, width)
        self.offset_head = OffsetHead(width)
        self.state_proj = StateProjection({emb.name: emb.state_dim for emb in registry}, width)
        self.box_proj = BoxProjection(width) if config.target_token else None
        moe_layers = [i for i in range(language.config.num_hidden_layers) if language.config.is_moe_layer(i)]
        self.router_prior = (RouterPrior(len(registry), moe_layers, language.config.n_routed_experts)
                             if config.router_prior and moe_layers else None)
        self.binners = {emb.name: ActionTokenizer(emb.action_dim, n_bins=config.n_bins, name=emb.name) for emb in registry}
        self._text_cache: dict[str, list[int]] = {}
        self.single_pass = False  # training: control steps and conversations in one language-model pass (FSDP2)
        self._queues: dict[int, deque] = {}
        self._ensemble: list[tuple[int, torch.Tensor]] = []
        self.last_grounding: list[str] = []  # ground_target: the boxes the last predicted chunks were planned on
        # `compile_decoding()`: the compiled language model for generated tokens (held in a dict, not registered as a
        # submodule: its parameters are the language model's, and the state dict stays as it is)
        self._compiled: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------------------------------
    # sequence assembly
    # ---------------------------------------------------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        if text not in self._text_cache:
            self._text_cache[text] = self.tokenizer.encode(text)
        return self._text_cache[text]

    def _embodiments(self, batch: dict[str, Any], size: int) -> list[Embodiment]:
        names = batch.get("embodiment")
        if names is None:
            if len(self.registry) != 1:
                raise ValueError(f"batch has no 'embodiment' key and the policy knows several: {self.registry.names()}")
            names = [self.registry.names()[0]] * size
        elif isinstance(names, str):
            names = [names] * size
        return [self.registry.get(n) for n in names]

    def _frames(self, batch: dict[str, Any], embodiments: list[Embodiment]) -> list[list[torch.Tensor]]:
        """Per sample, its cameras' image-token embeddings (one (n, D) tensor per camera)."""
        tile = self.backbone.config.vision.image_size
        frames, owners = [], []
        for b, emb in enumerate(embodiments):
            for camera in emb.cameras:
                if camera not in batch:
                    raise KeyError(f"embodiment {emb.name!r} needs camera {camera!r}; batch has "
                                   f"{sorted(k for k in batch if k.startswith('observation.image'))}")
                frames.append(batch[camera][b])
                owners.append(b)
        per_sample: list[list[torch.Tensor]] = [[] for _ in embodiments]
        if not frames:
            return per_sample
        pixels = torch.stack(frames).float()
        if pixels.shape[-2:] != (tile, tile):
            pixels = F.interpolate(pixels, size=(tile, tile), mode="bilinear", antialias=True, align_corners=False)
        pixels = pixels * 2.0 - 1.0  # [0, 1] -> [-1, 1], the processor's normalization
        encoder = self.backbone.vision_encoder
        tiles_NLD = encoder.encode_tiles(pixels.to(self.device))
        if self.config.global_view_only:
            tokens = layout_global_view(tiles_NLD, encoder.image_newline)
        else:  # a frame at tile resolution: the local tile equals the global view
            tokens = torch.stack([layout_image_tokens(torch.stack([t, t]), encoder.image_newline,
                                                      encoder.view_seperator, 1, 1) for t in tiles_NLD])
        for owner, t in zip(owners, tokens):
            per_sample[owner].append(t)
        return per_sample

    def build_sequences(self, batch: dict[str, Any], target_bins: list[torch.Tensor] | None = None,
                        grounding: list[list[int]] | None = None, prompt_only: bool = False) -> SequenceBatch:
        """Embeddings of one control step per sample. Parallel decoding puts the queries at the action positions;
        autoregressive decoding puts the target action tokens there (`target_bins`, teacher forcing) or nothing
        (inference: the prompt only). `grounding` (token ids per sample, ground_target) goes between the prompt and
        the action positions; `prompt_only` stops after `<|Assistant|>:`."""
        tasks = batch.get("task") or [""] * len(batch["observation.state"])
        if isinstance(tasks, str):
            tasks = [tasks]
        embodiments = self._embodiments(batch, len(tasks))
        frames = self._frames(batch, embodiments)
        state = batch["observation.state"]
        tok = self.tokenizer
        with_actions = not prompt_only and (self.config.decoding == "parallel" or target_bins is not None)

        # the state tokens of each robot's samples in one projection, one query block per chunk layout shared by the
        # samples that have it (not per sample: device ops forward and backward, on a GPU kernel launches)
        state_tokens: list[torch.Tensor | None] = [None] * len(embodiments)
        for samples, pick in _by_robot(embodiments):
            emb = embodiments[samples[0]]
            tokens_GD = self.state_proj(emb.name, state[pick, : emb.state_dim].to(self.device))
            for g, b in enumerate(samples):
                state_tokens[b] = tokens_GD[g:g + 1]
        queries: dict[tuple[int, int], torch.Tensor] = {}

        rows = []  # per sample: list of (kind, ids or embeddings)
        ground_segment = []  # per sample: the index of its grounding answer's segment
        for b, (emb, task) in enumerate(zip(embodiments, tasks)):
            task = str(task).strip()
            # <|User|>: [images] \n{task} <|emb|> ..., or with instruction_first <|User|>: {task}\n [images] <|emb|> ...
            head, tail = ("<|User|>: " + task + "\n", "") if self.config.instruction_first else ("<|User|>: ", "\n" + task)
            segments: list[tuple[int, Any]] = [(TEXT, [tok.bos_id] + self._encode_text(head))]
            segments += [(IMAGE, f) for f in frames[b]]
            segments.append((TEXT, self._encode_text(tail) + [self.embodiment_token_id[emb.name]]))
            segments.append((STATE, state_tokens[b]))
            segments.append((TEXT, self._encode_text("\n\n<|Assistant|>:")))
            if grounding is not None and not prompt_only:
                ground_segment.append(len(segments))
                segments.append((TEXT, list(grounding[b])))
                if self.box_proj is not None:
                    segments.append((STATE, self.box_proj(self._answer_box(grounding[b]))[None]))
            if with_actions:
                if self.config.decoding == "parallel":
                    layout = (emb.chunk_len, emb.action_dim)
                    if layout not in queries:
                        queries[layout] = self.queries(*layout)
                    segments.append((ACTION, queries[layout]))
                else:
                    segments.append((ACTION, self.action_token_ids[target_bins[b].reshape(-1)].tolist()))
            rows.append(segments)

        lengths = [sum(len(content) for _, content in segments) for segments in rows]
        B, T = len(rows), max(lengths)
        embed = self.backbone.language.embed
        width = self.backbone.language.config.hidden_size
        # the index tensors are laid out on the host and copied once each (not written slice by slice on the device)
        ids_BT = np.full((B, T), tok.pad_id, dtype=np.int64)
        kinds_BT = np.full((B, T), PAD, dtype=np.int64)
        emb_index_BT = np.full((B, T), -1, dtype=np.int64)
        dense_slots: list[tuple[int, torch.Tensor]] = []  # (flat position of the first row, embeddings)
        action_start, num_actions = [], []
        ground_start, num_ground = [], []
        for b, segments in enumerate(rows):
            pos = T - lengths[b]  # left padding
            for i, (kind, content) in enumerate(segments):
                n = len(content)
                if ground_segment and i == ground_segment[b]:
                    ground_start.append(pos)
                    num_ground.append(n)
                kinds_BT[b, pos:pos + n] = kind
                if isinstance(content, list):
                    ids_BT[b, pos:pos + n] = content
                else:
                    dense_slots.append((b * T + pos, content))
                if kind == ACTION:
                    action_start.append(pos)
                    num_actions.append(n)
                    emb_index_BT[b, pos:pos + n] = self.registry.index(embodiments[b].name)
                pos += n
            if not with_actions:
                action_start.append(T)
                num_actions.append(embodiments[b].num_action_tokens)
        ids, kinds, emb_index = (torch.from_numpy(a).to(self.device) for a in (ids_BT, kinds_BT, emb_index_BT))
        x_BTD = embed(ids)
        if dense_slots:  # images, state and query embeddings replace their placeholder positions
            index = torch.from_numpy(np.concatenate([np.arange(start, start + len(c)) for start, c in dense_slots]))
            values = torch.cat([c.to(x_BTD.dtype) for _, c in dense_slots])
            x_BTD = x_BTD.reshape(B * T, width).index_copy(0, index.to(self.device), values).reshape(B, T, width)
        block_ids = None
        if self.config.decoding == "parallel":
            block_ids = torch.where(kinds == ACTION, 0, -1)
        return SequenceBatch(x_BTD, kinds != PAD, kinds, block_ids, emb_index, action_start, num_actions,
                             ground_start, num_ground)

    # ---------------------------------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], return_terms: bool = False):
        """Training loss and metrics of a batch of control steps (robot keys) and/or scene conversations (`vqa`).

        The loss is a sum of terms, each a mean over its own units (`loss_weights` counts them): `action` (bin
        cross-entropy, per real action token), `offset` (in-bin L1 x offset_loss_weight, per action token), `aux`
        (MoE balance loss, per sequence), `vqa` (next-token loss on answers x vqa_loss_weight, per answer token).
        `return_terms=True` returns a LossOutput ({term: mean}, metrics, the sequence tokens run) so that the trainer
        can weigh each term by its units over the global step (the same loss with any process count or
        accumulation); otherwise (summed loss, metrics).

        Control steps and conversations run through the language model as two batches, or, with `single_pass` (set
        for FSDP2, which needs every micro-batch to run the decoder layers once so that all processes issue the same
        collectives), as one left-padded batch: the same numbers, but short control steps padded to the length of
        the conversations."""
        terms: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        if self.training and self.config.camera_dropout and "observation.state" in batch:
            batch = self._drop_cameras(batch)
        robot = self._robot_targets(batch) if "observation.state" in batch else None
        grounding = self._recorded_grounding(batch) if robot and self.config.ground_target else None
        seq = self.build_sequences(batch, robot["bins"] if robot and self.config.decoding == "autoregressive" else None,
                                   grounding) if robot else None
        vqa = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch["vqa"].items()} \
            if batch.get("vqa") is not None else None
        if seq is None and vqa is None:
            raise ValueError("batch has neither robot keys ('observation.state') nor scene conversations ('vqa')")
        parts = [] if seq is None else [(seq.inputs_embeds, seq.attention_mask, seq.block_ids, seq.embodiment_index)]
        if vqa is not None:
            embeds = self.backbone.prepare_inputs_embeds(vqa["input_ids"], vqa.get("images"), vqa.get("images_seq_mask"),
                                                         vqa.get("images_spatial_crop"))
            parts.append((embeds, vqa["attention_mask"].bool(), None, torch.full(embeds.shape[:2], -1, device=self.device)))
        hidden, aux_parts = [], []  # per part its (B, T_part, D) hidden states; per pass (aux loss, sequences)
        for group in ([parts] if self.single_pass else [[part] for part in parts]):
            x_BTD, mask_BT, block_ids, emb_index = _stack_left_padded(group)
            out = self.backbone.language(inputs_embeds=x_BTD, attention_mask=mask_BT, block_ids=block_ids,
                                         router_bias=self.router_prior(emb_index) if self.router_prior is not None else None,
                                         compute_logits=False)
            start = 0
            for x, *_ in group:  # each part right-aligned in the pass's padded batch
                hidden.append(out.hidden_states[start:start + len(x), x_BTD.shape[1] - x.shape[1]:])
                start += len(x)
            if out.aux_loss is not None:
                aux_parts.append((out.aux_loss, len(x_BTD)))
        if seq is not None:
            self._action_terms(hidden[0], seq, robot, terms, metrics)
            if grounding is not None:
                self._ground_term(hidden[0], seq, grounding, terms, metrics)
        if vqa is not None:
            lm = next_token_loss(self.backbone.language.lm_head(hidden[-1]).float(), vqa)
            terms["vqa"] = self.config.vqa_loss_weight * lm
            metrics["vqa_loss"] = float(lm.detach())
        if aux_parts:  # one balance term per sequence (seq_aux), robot and conversation alike
            terms["aux"] = sum(a * n for a, n in aux_parts) / sum(n for _, n in aux_parts)
            metrics["aux_loss"] = float(terms["aux"].detach())
        if self.training:  # zeros for the parameters outside the decoder layers this batch did not use
            first = next(iter(terms))
            terms[first] = gradients_for_all(terms[first], self._outside_layers())
        loss = sum(terms.values())
        metrics["loss"] = float(loss.detach())
        if return_terms:
            return LossOutput(terms, metrics, tokens=float(sum(m.sum() for _, m, _, _ in parts)))
        return loss, metrics

    def loss_weights(self, batch: dict[str, Any]) -> dict[str, float]:
        """Units each term of `forward` averages over in this batch (every term, 0 where it is absent)."""
        weights = {"action": 0.0, "offset": 0.0, "aux": 0.0, "vqa": 0.0}
        cfg = self.backbone.config.language
        aux_on = self.training and cfg.aux_loss_alpha > 0 and cfg.scoring_func == "softmax" and any(
            self.backbone.config.language.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        if "observation.state" in batch:
            embodiments = self._embodiments(batch, len(batch["observation.state"]))
            is_pad = batch.get("action_is_pad")
            n = sum(e.action_dim * (e.chunk_len if is_pad is None else float(self._step_weights(is_pad[b, : e.chunk_len]).sum()))
                    for b, e in enumerate(embodiments))
            weights["action"] = float(n)
            weights["offset"] = float(n) if self.config.continuous_offset else 0.0
            weights["aux"] += float(len(embodiments)) if aux_on else 0.0
            if self.config.ground_target:
                weights["ground"] = float(sum(len(ids) for ids in self._recorded_grounding(batch)))
        elif self.config.ground_target:
            weights["ground"] = 0.0
        if batch.get("vqa") is not None:
            weights["vqa"] = float((shifted_targets(batch["vqa"]) != -100).sum())
            weights["aux"] += float(len(batch["vqa"]["input_ids"])) if aux_on else 0.0
        return weights

    def _drop_cameras(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A copy of `batch` with each `camera_dropout` camera black in its share of the samples (never a robot's
        only camera)."""
        batch = dict(batch)
        embodiments = self._embodiments(batch, len(batch["observation.state"]))
        others = torch.tensor([len(e.cameras) > 1 for e in embodiments])  # samples with another camera to read
        for camera, share in self.config.camera_dropout.items():
            if camera in batch and share > 0:
                frames = batch[camera]
                keep = ((torch.rand(len(frames)) >= share) | ~others).to(frames.device, frames.dtype)
                batch[camera] = frames * keep.view(-1, *([1] * (frames.dim() - 1)))
        return batch

    def _step_weights(self, is_pad_H: torch.Tensor) -> torch.Tensor:
        """(..., H) loss weight of each chunk step: 1, or `pad_loss_weight` past the episode's end."""
        return torch.where(is_pad_H.bool(), self.config.pad_loss_weight, 1.0)

    def _robot_targets(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Per sample: target bins and in-bin offsets of its robot's H x A chunk, and weights (`pad_loss_weight` on
        steps past the episode's end)."""
        embodiments = self._embodiments(batch, len(batch["observation.state"]))
        actions, is_pad = batch["action"].to(self.device), batch.get("action_is_pad")
        out: dict[str, Any] = {"embodiments": embodiments, "bins": [None] * len(embodiments),
                               "offsets": [None] * len(embodiments), "weights": [None] * len(embodiments)}
        for samples, rows in _by_robot(embodiments):  # one encoding per robot
            emb = embodiments[samples[0]]
            if actions.shape[1] < emb.chunk_len:
                raise ValueError(f"sample {samples[0]} ({emb.name}): action chunk has {actions.shape[1]} steps, needs "
                                 f"{emb.chunk_len}")
            bins_GHA, offs_GHA = self.binners[emb.name].encode_with_offsets(
                actions[rows, : emb.chunk_len, : emb.action_dim].float())
            pad_GH = is_pad[rows, : emb.chunk_len].to(self.device) if is_pad is not None else \
                torch.zeros(len(samples), emb.chunk_len, dtype=torch.bool, device=self.device)
            weights_GHA = self._step_weights(pad_GH)[..., None].expand(-1, -1, emb.action_dim)
            for g, b in enumerate(samples):
                out["bins"][b], out["offsets"][b], out["weights"][b] = bins_GHA[g], offs_GHA[g], weights_GHA[g]
        return out

    def _action_terms(self, hidden_BTD: torch.Tensor, seq: SequenceBatch, robot: dict[str, Any],
                      terms: dict[str, torch.Tensor], metrics: dict[str, float]) -> None:
        """The action-token terms (and per-embodiment metrics) from the robot rows' hidden states."""
        hidden_ND, _ = self._action_hidden(hidden_BTD, seq)
        bin_logits = self._bin_logits(hidden_ND)
        target_N = torch.cat([t.reshape(-1) for t in robot["bins"]])
        weight_N = torch.cat([w.reshape(-1) for w in robot["weights"]])
        pred_offsets = self.offset_head(hidden_ND) if self.config.continuous_offset else None
        losses = action_losses(bin_logits, target_N, weight_N, pred_offsets,
                               torch.cat([o.reshape(-1) for o in robot["offsets"]]).float(), self.config.target_sigma_bins)
        terms["action"] = losses["action_ce"]
        if pred_offsets is not None:
            terms["offset"] = self.config.offset_loss_weight * losses["offset_l1"]
        metrics.update({k: float(v.detach()) for k, v in losses.items()})
        # per-embodiment action loss, for logging
        ce_N = F.cross_entropy(bin_logits.detach().float(), target_N, reduction="none")
        sample_N = torch.from_numpy(np.repeat(np.arange(len(robot["weights"])), [w.numel() for w in robot["weights"]]))
        sample_N = sample_N.to(ce_N.device)
        ce_sum_B = ce_N.new_zeros(len(robot["weights"])).index_add(0, sample_N, ce_N * weight_N)
        weight_sum_B = ce_N.new_zeros(len(robot["weights"])).index_add(0, sample_N, weight_N.float())
        per_sample = (ce_sum_B / weight_sum_B.clamp(min=1)).tolist()  # one host copy for all samples
        per_emb: dict[str, list[float]] = {}
        for emb, ce in zip(robot["embodiments"], per_sample):
            per_emb.setdefault(emb.name, []).append(ce)
        metrics.update({f"loss/{name}": float(np.mean(v)) for name, v in per_emb.items()})

    def _answer_box(self, ids: list[int]) -> list[float] | None:
        """The first box of a grounding answer (0..999), None when it holds none."""
        found = [box for _, boxes in parse_grounding(self.tokenizer.decode(ids)) for box in boxes]
        return list(found[0]) if found else None

    def _recorded_grounding(self, batch: dict[str, Any]) -> list[list[int]]:
        """Token ids of each robot sample's recorded grounding answer (batch key `grounding`, ground_target)."""
        texts = batch.get("grounding")
        size = len(batch["observation.state"])
        texts = [texts] * size if isinstance(texts, str) else texts
        if texts is None or not all(texts):
            raise ValueError("ground_target trains on each robot sample's 'grounding' (where the instruction's object "
                             "is: datasets collected by `vla collect` record it in meta/collection.json); this batch "
                             f"has {'none' if texts is None else sum(not t for t in texts)} of {size} missing")
        return [self._encode_text(str(t)) for t in texts]

    def _ground_term(self, hidden_BTD: torch.Tensor, seq: SequenceBatch, grounding: list[list[int]],
                     terms: dict[str, torch.Tensor], metrics: dict[str, float]) -> None:
        """Next-token loss on the grounding answers (each token predicted from the position before it)."""
        logits_ND = self.backbone.language.lm_head(_spans(hidden_BTD, seq.ground_start, seq.num_ground, shift=1)).float()
        target_N = torch.tensor([i for ids in grounding for i in ids], device=logits_ND.device)
        loss = F.cross_entropy(logits_ND, target_N)
        terms["ground"] = self.config.ground_loss_weight * loss
        metrics["ground_loss"] = float(loss.detach())
        metrics["ground_token_acc"] = float((logits_ND.detach().argmax(-1) == target_N).float().mean())

    @torch.no_grad()
    def _generate_grounding(self, batch: dict[str, Any]) -> list[list[int]]:
        """Greedy grounding answers of each sample's prompt, up to `<|/det|>` (kept in `last_grounding`)."""
        seq = self.build_sequences(batch, prompt_only=True)
        tok = self.tokenizer
        stop = tok.token_id("<|/det|>")
        new_BN = generate(self.backbone.language, inputs_embeds=seq.inputs_embeds, attention_mask=seq.attention_mask,
                          max_new_tokens=self.config.max_grounding_tokens, stop_token_ids=[stop],
                          pad_token_id=tok.pad_id, router_bias=self._router_bias(seq),
                          decode_model=self._compiled.get("decoder"))
        out = [row[: row.index(stop) + 1] if stop in row else row for row in new_BN.tolist()]
        self.last_grounding = [tok.decode(ids) for ids in out]
        return out

    def _outside_layers(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters()
                if p.requires_grad and not name.startswith("backbone.language.model.layers.")]

    def _router_bias(self, seq: SequenceBatch) -> dict[int, torch.Tensor] | None:
        return self.router_prior(seq.embodiment_index) if self.router_prior is not None else None

    def _action_hidden(self, hidden_BTD: torch.Tensor, seq: SequenceBatch) -> tuple[torch.Tensor, list[int]]:
        """Hidden states that predict each action token: the action position itself (parallel) or the one before
        it (autoregressive). Returns (N, D) over the batch in order, and the per-sample counts."""
        shift = 0 if self.config.decoding == "parallel" else 1
        return _spans(hidden_BTD, seq.action_start, seq.num_actions, shift), seq.num_actions

    def _bin_logits(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        """Logits over the action bins only, through the LM head's action-token rows."""
        return F.linear(hidden_ND, head_rows(self.backbone.language.lm_head, self.action_token_ids)).float()

    # ---------------------------------------------------------------------------------------------------------------
    # inference
    # ---------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, H_max, A_max) normalized actions (each robot's own H x A block; zeros beyond)."""
        embodiments = self._embodiments(batch, len(batch["observation.state"]))
        if self.config.decoding == "parallel":
            seq = self.build_sequences(batch, grounding=self._generate_grounding(batch) if self.config.ground_target else None)
            out = self.backbone.language(inputs_embeds=seq.inputs_embeds, attention_mask=seq.attention_mask,
                                         block_ids=seq.block_ids, router_bias=self._router_bias(seq), compute_logits=False)
            hidden_ND, counts = self._action_hidden(out.hidden_states, seq)
            bins_N = self._bin_logits(hidden_ND).argmax(-1)
        else:
            bins_N, hidden_ND, counts = self._decode_autoregressive(batch, embodiments)
        offsets_N = self.offset_head(hidden_ND) if self.config.continuous_offset else None
        H = max(e.chunk_len for e in embodiments)
        A = max(e.action_dim for e in embodiments)
        chunk_BHA = torch.zeros(len(embodiments), H, A, device=self.device)
        start = 0
        for b, (emb, n) in enumerate(zip(embodiments, counts)):
            bins = bins_N[start:start + n].reshape(emb.chunk_len, emb.action_dim)
            offs = offsets_N[start:start + n].reshape(emb.chunk_len, emb.action_dim) if offsets_N is not None else None
            chunk_BHA[b, : emb.chunk_len, : emb.action_dim] = self.binners[emb.name].decode(bins, offs).to(chunk_BHA.device)
            start += n
        return chunk_BHA

    def _decode_autoregressive(self, batch, embodiments):
        """Prefill the prompt into the latent KV cache, then decode H*A tokens constrained to the action bins; one
        teacher-forced pass over the decoded tokens reads the offsets when the offset head is on. Every decoded token
        is an action token of its sample's robot, so it gets that robot's router prior, as in the teacher-forced pass
        (equality with its argmax: tests/vla/policy/test_policy.py::test_cached_autoregressive_decoding_equals_teacher_forced_argmax)."""
        seq = self.build_sequences(batch)
        n_max = max(e.num_action_tokens for e in embodiments)
        prompt_bias = step_bias = None
        if self.router_prior is not None:
            prompt_bias = self._router_bias(seq)
            robot_B1 = torch.tensor([[self.registry.index(e.name)] for e in embodiments], device=self.device)
            step_bias = {layer: b[:, 0] for layer, b in self.router_prior(robot_B1).items()}
        tokens_BN = generate(self.backbone.language, inputs_embeds=seq.inputs_embeds, attention_mask=seq.attention_mask,
                             max_new_tokens=n_max, allowed_token_ids=self.action_token_ids,
                             router_bias=prompt_bias, decode_router_bias=step_bias,
                             decode_model=self._compiled.get("decoder"))
        lookup = torch.full((int(self.action_token_ids.max()) + 1,), -1, dtype=torch.long, device=self.device)
        lookup[self.action_token_ids] = torch.arange(len(self.action_token_ids), device=self.device)
        bins_BN = lookup[tokens_BN]
        per_sample = [bins_BN[b, : e.num_action_tokens].reshape(e.chunk_len, e.action_dim) for b, e in enumerate(embodiments)]
        hidden = None
        if self.config.continuous_offset:
            full = self.build_sequences(batch, per_sample)
            out = self.backbone.language(inputs_embeds=full.inputs_embeds, attention_mask=full.attention_mask,
                                         router_bias=self._router_bias(full), compute_logits=False)
            hidden, _ = self._action_hidden(out.hidden_states, full)
        return torch.cat([p.reshape(-1) for p in per_sample]), hidden, [e.num_action_tokens for e in embodiments]

    @property
    def generates(self) -> bool:
        """Whether a chunk generates tokens one pass at a time (grounding first, or autoregressive action tokens)."""
        return self.config.ground_target or self.config.decoding == "autoregressive"

    @torch.no_grad()
    def compile_decoding(self, warm_batch_sizes: tuple[int, ...] = ()) -> float:
        """Generated tokens (the grounding answer of `ground_target`, autoregressive action tokens) run through the
        language model compiled by `backbone.generate.compile_decoder`: several times faster per token once the first
        call (tens of seconds on a CPU) has compiled it. The prompt's pass and the action pass stay eager.
        `warm_batch_sizes`: compile now, by predicting a chunk from blank frames at each of these batch sizes (a server
        does this before its first request: batch 1 and larger batches compile apart). Returns the seconds that took."""
        self._compiled["decoder"] = compile_decoder(self.backbone.language)
        start = time.perf_counter()
        emb, tile = self.registry.get(self.registry.names()[0]), self.backbone.config.vision.image_size
        for size in warm_batch_sizes:
            batch = {camera: torch.zeros(size, 3, tile, tile, device=self.device) for camera in emb.cameras}
            batch.update({"observation.state": torch.zeros(size, emb.state_dim, device=self.device),
                          "task": ["warm up"] * size, "embodiment": [emb.name] * size})
            self.predict_action_chunk(batch)
        self.last_grounding = []
        return time.perf_counter() - start

    def reset(self) -> None:
        self._queues.clear()
        self._ensemble.clear()

    @torch.no_grad()
    def select_action(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, A_max) normalized action for this step: a new chunk when the queue is empty (or every step with
        temporal ensembling), then served from the queue."""
        embodiments = self._embodiments(batch, len(batch["observation.state"]))
        B = len(embodiments)
        if self.config.temporal_ensemble_coeff is not None:
            return self._select_ensembled(batch, embodiments)
        if not self._queues or any(len(self._queues.get(b, ())) == 0 for b in range(B)):
            chunk = self.predict_action_chunk(batch)
            for b, emb in enumerate(embodiments):
                steps = self.config.n_action_steps or emb.chunk_len
                self._queues[b] = deque(chunk[b, : min(steps, emb.chunk_len)])
        return torch.stack([self._queues[b].popleft() for b in range(B)])

    def _select_ensembled(self, batch, embodiments) -> torch.Tensor:
        """ACT temporal ensembling: every step predicts a chunk; the action for now averages all chunks' predictions
        for now with weights exp(-coeff * i), i = 0 for the oldest. A chunk covers its own robot's H steps only (in a
        mixed batch the chunk is padded to the largest H; those padded zeros never count)."""
        chunk = self.predict_action_chunk(batch)
        self._ensemble = [(age + 1, c) for age, c in self._ensemble if age + 1 < c.shape[1]] + [(0, chunk)]
        coeff = self.config.temporal_ensemble_coeff
        preds = torch.stack([c[:, age] for age, c in self._ensemble])  # (K, B, A) oldest first
        ages = torch.tensor([age for age, _ in self._ensemble], device=preds.device)
        horizon = torch.tensor([e.chunk_len for e in embodiments], device=preds.device)
        covers = ages[:, None] < horizon[None, :]  # (K, B): chunk k still holds an action for sample b
        index = covers.cumsum(0) - 1  # position among the covering chunks (a suffix), oldest = 0
        w = torch.where(covers, torch.exp(-coeff * index.to(preds.dtype)), torch.zeros((), dtype=preds.dtype, device=preds.device))
        return (preds * w[:, :, None]).sum(0) / w.sum(0)[:, None]

    # ---------------------------------------------------------------------------------------------------------------
    # routing analysis, saving, loading
    # ---------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def route(self, batch: dict[str, Any]):
        """(router outputs per layer, token kinds (B, T), embodiment per sample) of one forward pass on `batch`."""
        embodiments = self._embodiments(batch, len(batch["observation.state"]))
        targets = None
        if self.config.decoding == "autoregressive":
            targets = [self.binners[e.name].encode(batch["action"][b, : e.chunk_len, : e.action_dim].float().to(self.device))
                       for b, e in enumerate(embodiments)]
        grounding = None
        if self.config.ground_target:  # the recorded answers where the batch has them, else the policy's own
            grounding = self._recorded_grounding(batch) if batch.get("grounding") else self._generate_grounding(batch)
        seq = self.build_sequences(batch, targets, grounding)
        out = self.backbone.language(inputs_embeds=seq.inputs_embeds, attention_mask=seq.attention_mask,
                                     block_ids=seq.block_ids, router_bias=self._router_bias(seq), compute_logits=False,
                                     return_router=True)
        return out.router, seq.kinds, [e.name for e in embodiments]

    @property
    def device(self) -> torch.device:
        return self.backbone.language.lm_head.weight.device

    def save(self, path: str | Path, extra: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """policy_config.json + policy_head.safetensors, and the backbone (official DeepSeek-VL2 format, with the
        tokenizer that includes the action tokens) in backbone/, so `vla vqa checkpoint=PATH` works on it.
        `state_dict` (e.g. gathered from FSDP shards) replaces this module's own."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        write_checkpoint(path / BACKBONE_DIR, self.backbone.config.to_official(), deepseek_vl2_to_official(backbone_state))
        self.tokenizer.save(path / BACKBONE_DIR)
        head = {k: v.detach().cpu().contiguous() for k, v in state.items() if not k.startswith("backbone.")}
        save_file(head, str(path / POLICY_WEIGHTS))
        meta = {"config": dataclasses.asdict(self.config), "registry": self.registry.to_dict(),
                "normalizer_stats": self.normalizer_stats} | (extra or {})
        (path / POLICY_CONFIG).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", merge_adapters: bool = False) -> "VLAPolicy":
        """A policy checkpoint (folder or hub id). A LoRA checkpoint is its base with the adapter on it, or with
        `merge_adapters` the adapter folded into the base: the same actions (to 1e-5) without the adapters' cost in
        every pass, what rollouts and serving load."""
        path = checkpoint_folder(path)  # a folder, or a hub id in the local Hugging Face cache
        if not (path / POLICY_CONFIG).is_file():
            raise FileNotFoundError(f"{path}: no {POLICY_CONFIG} (not a policy checkpoint)")
        if is_adapter_checkpoint(path):  # a LoRA checkpoint: its base + the adapter
            policy = load_adapter_policy(path, device)
            return merge_lora(policy).eval() if merge_adapters else policy
        meta = read_json_file(path / POLICY_CONFIG)
        backbone = load_deepseek_vl2(path / BACKBONE_DIR)
        tokenizer = load_tokenizer(path / BACKBONE_DIR)
        policy = cls(VLAPolicyConfig(**meta["config"]), backbone, tokenizer,
                     EmbodimentRegistry.from_dict(meta["registry"]), meta.get("normalizer_stats"))
        state = read_safetensors_file(path / POLICY_WEIGHTS)
        missing, unexpected = policy.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise RuntimeError(f"{path / POLICY_WEIGHTS}: missing {missing}, unexpected {unexpected}")
        return policy.to(device).eval()


def _by_robot(embodiments: list[Embodiment]):
    """Per robot of a batch, in order of first appearance: its samples' positions, and the index that selects their
    rows (a slice when the batch is that robot's alone: a view, not a gather)."""
    for name in dict.fromkeys(e.name for e in embodiments):
        samples = [b for b, e in enumerate(embodiments) if e.name == name]
        yield samples, (samples if len(samples) < len(embodiments) else slice(None))


def _spans(hidden_BTD: torch.Tensor, starts: list[int], counts: list[int], shift: int) -> torch.Tensor:
    """(N, D): per sample b its positions starts[b] - shift .. + counts[b], concatenated in batch order (shift 1 = the
    positions that predict the span's tokens)."""
    return torch.cat([hidden_BTD[b, start - shift: start - shift + n] for b, (start, n) in enumerate(zip(starts, counts))])


def _stack_left_padded(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]):
    """Left-padded batches (inputs_embeds (B, T, D), attention_mask, block_ids or None, embodiment_index) stacked
    into one, padded on the left to the longest T; block_ids None when no part has any."""
    if len(parts) == 1:
        return parts[0]
    T = max(x.shape[1] for x, _, _, _ in parts)
    pad = lambda t, value: F.pad(t, (0, 0) * (t.ndim - 2) + (T - t.shape[1], 0), value=value)  # noqa: E731
    x = torch.cat([pad(x, 0.0) for x, _, _, _ in parts])
    mask = torch.cat([pad(m, False) for _, m, _, _ in parts])
    emb = torch.cat([pad(e, -1) for _, _, _, e in parts])
    blocks = None
    if any(b is not None for _, _, b, _ in parts):
        blocks = torch.cat([pad(b if b is not None else torch.full(m.shape, -1, device=m.device), -1)
                            for _, m, b, _ in parts])
    return x, mask, blocks, emb


def build_policy(config: VLAPolicyConfig, registry: EmbodimentRegistry, tokenizer: Tokenizer,
                 backbone: DeepseekVL2 | str = "test", normalizer_stats: dict[str, Any] | None = None,
                 **backbone_overrides: Any) -> VLAPolicy:
    """A policy on a backbone (a model, a checkpoint folder, or a preset name built at random)."""
    if isinstance(backbone, str):
        if Path(backbone).is_dir():
            backbone = load_deepseek_vl2(backbone)
        else:
            vocab = max(len(tokenizer), backbone_overrides.pop("vocab_size", 0))
            backbone = build_deepseek_vl2(deepseek_vl2_preset(backbone, vocab_size=vocab, **backbone_overrides))
    return VLAPolicy(config, backbone, tokenizer, registry, normalizer_stats)

