"""LeRobot `PreTrainedPolicy` around our `vla.policy.VLAPolicy` (`--policy.type=dsvla`).

`DSVLAPolicy.model` is the VLAPolicy. Batches reach it as lerobot's processors leave them (state and action
normalized, images float in [0, 1]); this wrapper only tags them with the configured embodiment and fills a missing
`task`. Saving writes lerobot's `config.json` and the VLAPolicy's own files into one folder; loading reads the
VLAPolicy straight from them (no random model is built first).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lerobot.configs import PreTrainedConfig
from lerobot.configs.types import NormalizationMode
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import ACTION, OBS_STATE

from backbone.tokenizer import build_bpe_tokenizer
from envs.normalize import Normalizer
from heads.embodiment import Embodiment, EmbodimentRegistry
from vla.policy import POLICY_CONFIG, VLAPolicy, VLAPolicyConfig, build_policy

from .configuration_dsvla import SHARED_POLICY_FIELDS, DSVLAConfig

logger = logging.getLogger(__name__)

# lerobot normalization modes -> envs.normalize / heads.embodiment names
NORM_MODES = {
    NormalizationMode.QUANTILES: "quantile",
    NormalizationMode.QUANTILE10: "quantile10",
    NormalizationMode.MEAN_STD: "mean_std",
    NormalizationMode.MIN_MAX: "min_max",
    NormalizationMode.IDENTITY: "identity",
}


def normalizer_stats_from_lerobot(config: DSVLAConfig, stats: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    """lerobot dataset stats -> VLAPolicy.normalizer_stats entry for the config's embodiment (an
    `envs.normalize.Normalizer.to_dict()`, what our own `EnvPolicy` rollouts read); None when stats are missing."""
    if not stats:
        return None
    modes = {ACTION: NORM_MODES[NormalizationMode(config.normalization_mapping["ACTION"])]}
    if OBS_STATE in (config.input_features or {}):
        modes[OBS_STATE] = NORM_MODES[NormalizationMode(config.normalization_mapping["STATE"])]
    plain = {key: {name: _to_numpy(value) for name, value in stats[key].items()} for key in modes if key in stats}
    try:
        return Normalizer.from_stats(plain, modes, name=config.embodiment).to_dict()
    except ValueError as error:  # StatsError: missing/non-finite stats; lerobot's processors will complain too
        logger.warning("dsvla: normalizer stats not kept in the VLAPolicy: %s", error)
        return None


def _to_numpy(value: Any):
    return value.detach().cpu().numpy() if isinstance(value, Tensor) else value


def build_vla_policy(config: DSVLAConfig, dataset_stats: dict[str, dict[str, Any]] | None = None,
                     dataset_meta: Any | None = None) -> VLAPolicy:
    """A fresh (randomly initialised) VLAPolicy with one embodiment described by the lerobot config's features."""
    config.validate_features()
    fps = float(getattr(dataset_meta, "fps", None) or config.fps)
    embodiment = Embodiment(
        name=config.embodiment,
        action_dim=config.action_dim,
        state_dim=config.state_dim,
        cameras=tuple(config.image_features),
        fps=fps,
        chunk_len=config.chunk_size,
    )
    vla_config = VLAPolicyConfig(
        **{name: getattr(config, name) for name in SHARED_POLICY_FIELDS},
        target_sigma_bins=config.target_sigma_bins,
        n_action_steps=config.n_action_steps,
        max_chunk_len=max(VLAPolicyConfig.max_chunk_len, config.chunk_size),
        max_action_dim=max(VLAPolicyConfig.max_action_dim, config.action_dim),
    )
    stats = normalizer_stats_from_lerobot(config, dataset_stats)
    tokenizer = build_bpe_tokenizer(vocab_size=config.tokenizer_vocab_size)
    return build_policy(vla_config, EmbodimentRegistry([embodiment]), tokenizer, config.backbone_preset,
                        normalizer_stats={config.embodiment: stats} if stats else None)


class DSVLAPolicy(PreTrainedPolicy):
    """lerobot policy = one embodiment of a VLAPolicy. `vla_policy` (keyword) wraps an existing VLAPolicy instead
    of building a fresh one from `config`."""

    config_class = DSVLAConfig
    name = "dsvla"

    def __init__(self, config: DSVLAConfig, dataset_stats: dict[str, dict[str, Any]] | None = None,
                 dataset_meta: Any | None = None, vla_policy: VLAPolicy | None = None, **kwargs: Any):
        super().__init__(config)
        config.validate_features()
        if vla_policy is None:
            vla_policy = build_vla_policy(config, dataset_stats, dataset_meta)
        self.model = vla_policy
        self._check_compatible()
        self._apply_inference_settings()

    # ----------------------------------------------------------------------------------------------------------------
    def _check_compatible(self) -> None:
        cfg, registry = self.config, self.model.registry
        if cfg.embodiment not in registry:
            raise ValueError(f"dsvla: config.embodiment={cfg.embodiment!r} is not in the policy's registry "
                             f"{registry.names()}; set --policy.embodiment=NAME")
        emb = registry.get(cfg.embodiment)
        if emb.action_dim != cfg.action_dim:
            raise ValueError(f"dsvla: embodiment {emb.name!r} acts in {emb.action_dim} dims but the action feature has "
                             f"shape {tuple(cfg.action_feature.shape)}")
        if emb.chunk_len != cfg.chunk_size:
            raise ValueError(f"dsvla: embodiment {emb.name!r} predicts chunks of {emb.chunk_len} steps but "
                             f"config.chunk_size={cfg.chunk_size}")
        if emb.state_dim > cfg.state_dim:
            raise ValueError(f"dsvla: embodiment {emb.name!r} reads {emb.state_dim} state dims but {OBS_STATE!r} has "
                             f"shape {tuple(cfg.robot_state_feature.shape)}")
        missing = [c for c in emb.cameras if c not in cfg.image_features]
        if missing:
            raise ValueError(f"dsvla: embodiment {emb.name!r} needs cameras {missing}, not among the image features "
                             f"{sorted(cfg.image_features)} (map them with --rename_map)")

    def _apply_inference_settings(self) -> None:
        """Decoding, chunk serving and ensembling come from the lerobot config (so CLI overrides such as
        --policy.n_action_steps=4 apply to a loaded checkpoint)."""
        vla_cfg, cfg = self.model.config, self.config
        if vla_cfg.decoding != cfg.decoding:
            logger.warning("dsvla: decoding %r overrides the checkpoint's %r", cfg.decoding, vla_cfg.decoding)
        vla_cfg.decoding = cfg.decoding
        vla_cfg.n_action_steps = cfg.n_action_steps
        vla_cfg.temporal_ensemble_coeff = cfg.temporal_ensemble_coeff
        self.model.reset()

    def _vla_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        size = len(out[OBS_STATE])
        out["embodiment"] = self.config.embodiment
        task = out.get("task")
        if task is None:
            out["task"] = [""] * size
        elif isinstance(task, str):
            out["task"] = [task] * size
        else:
            out["task"] = list(task)
        return out

    # ----------------------------------------------------------------------------------------------------------------
    # lerobot API
    # ----------------------------------------------------------------------------------------------------------------
    def get_optim_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def reset(self) -> None:
        self.model.reset()

    def forward(self, batch: dict[str, Tensor], reduction: str = "mean") -> tuple[Tensor, dict[str, float]]:
        if reduction != "mean":
            raise NotImplementedError(f"dsvla: forward supports reduction='mean' only, got {reduction!r}")
        return self.model(self._vla_batch(batch))

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs: Any) -> Tensor:
        """(B, chunk_size, action_dim) normalized actions."""
        return self.model.predict_action_chunk(self._vla_batch(batch))[:, : self.config.chunk_size, : self.config.action_dim]

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], **kwargs: Any) -> Tensor:
        """(B, action_dim) normalized action (a new chunk when the queue is empty)."""
        return self.model.select_action(self._vla_batch(batch))[:, : self.config.action_dim]

    # ----------------------------------------------------------------------------------------------------------------
    # PEFT (`lerobot-train --policy.path=CKPT --peft.method_type=LORA`)
    # ----------------------------------------------------------------------------------------------------------------
    def _get_default_peft_targets(self) -> dict[str, Any]:
        """LoRA on the attention projections (MLA q / kv_a / kv_b / o), dense MLPs, shared experts and the vision
        projector; the action head trains in full (`modules_to_save`) and so do the added vocabulary rows (action
        bins, embodiment tokens) of the embedding and the LM head (`trainable_token_indices`). Vision tower and
        router stay frozen, and so do the routed experts unless `--policy.lora_experts=true` (peft's
        `target_parameters`). See vla/policy/lora.py."""
        from vla.policy.lora import default_peft_targets

        return default_peft_targets(self.model, prefix="model.", experts=self.config.lora_experts)

    def _validate_peft_config(self, peft_config) -> None:
        """A base checkpoint is required (lerobot's check), and every `--peft.target_modules` entry must name at
        least one linear layer (one clear line otherwise)."""
        super()._validate_peft_config(peft_config)
        from vla.policy.lora import lora_target_names

        targets = peft_config.target_modules
        if targets and targets != "all-linear":
            entries = [targets] if isinstance(targets, str) else list(targets)
            # names are relative to this policy ("model.backbone...."); suffixes and regular expressions work too
            prefixed = [t[len("model."):] if isinstance(t, str) and t.startswith("model.") else t for t in entries]
            lora_target_names(self.model, targets=prefixed)

    # ----------------------------------------------------------------------------------------------------------------
    # saving / loading
    # ----------------------------------------------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """lerobot's config.json + the VLAPolicy files (policy_config.json, policy_head.safetensors, backbone/)."""
        if state_dict is not None:
            raise NotImplementedError("dsvla: saving a gathered (FSDP) state dict is not supported; train without "
                                      "--parallelism.dp_shard")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config._save_pretrained(save_directory)
        self.model.save(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path: str | Path, *, config: PreTrainedConfig | None = None,
                        **kwargs: Any) -> "DSVLAPolicy":
        """Load a local checkpoint folder (config.json + VLAPolicy files). Hub ids are not supported: download the
        repository first (e.g. `hf download REPO --local-dir DIR`) and pass DIR. `kwargs` (revision, dataset
        stats/meta, hub options) are accepted for lerobot's `make_policy` and ignored."""
        path = Path(pretrained_name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(f"dsvla loads local checkpoint folders only; {str(pretrained_name_or_path)!r} is not "
                                    f"a directory (download a Hub checkpoint first and pass its folder)")
        if not (path / POLICY_CONFIG).is_file():
            raise FileNotFoundError(f"{path}: no {POLICY_CONFIG}; not a dsvla checkpoint (make one with "
                                    f"lerobot_policy_dsvla.save_policy_for_lerobot or DSVLAPolicy.save_pretrained)")
        if config is None:
            config = PreTrainedConfig.from_pretrained(path)
        if not isinstance(config, DSVLAConfig):
            raise TypeError(f"{path}: config.json has policy type {config.type!r}, not 'dsvla'")
        device = config.device or "cpu"
        policy = cls(config, vla_policy=VLAPolicy.load(os.fspath(path), device=device))
        policy.to(device)
        policy.eval()
        return policy
