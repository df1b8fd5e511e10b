"""LeRobot config of the DeepSeek-VL2 action-token VLA (`--policy.type=dsvla`).

One lerobot policy serves ONE embodiment of our (possibly multi-embodiment) `vla.policy.VLAPolicy`: lerobot's eval
and train loops know one robot at a time, so the config names the embodiment every batch is tagged with. A
checkpoint folder holds lerobot's `config.json` (this class) beside the VLAPolicy files (`policy_config.json`,
`policy_head.safetensors`, `backbone/`) and the pre/post processors with the normalizer stats.

Units: lerobot's processors normalize `observation.state` and `action` with QUANTILES (q01/q99 -> [-1, 1], the same
formula as `envs.normalize`), images stay in [0, 1] (IDENTITY) - exactly what VLAPolicy expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode
from lerobot.optim import AdamWConfig
from lerobot.utils.constants import ACTION, OBS_STATE

DECODINGS = ("parallel", "autoregressive")
#: DSVLAConfig fields that are VLAPolicyConfig fields of the same name and meaning (copied both ways)
SHARED_POLICY_FIELDS = ("decoding", "n_bins", "continuous_offset", "global_view_only", "temporal_ensemble_coeff",
                        "router_prior")


@PreTrainedConfig.register_subclass("dsvla")
@dataclass
class DSVLAConfig(PreTrainedConfig):
    # --- the embodiment this lerobot policy drives (one of the VLAPolicy registry's) -------------------------------
    embodiment: str = "robot"
    chunk_size: int = 8  # H: actions predicted per chunk (= the embodiment's chunk_len)
    n_action_steps: int = 8  # actions served from a chunk before re-planning (<= chunk_size)
    fps: float = 10.0  # control rate, used when no dataset metadata gives one (fresh policies only)

    # --- decoding (inference-time settings; a loaded checkpoint takes these from this config) ----------------------
    decoding: str = "parallel"  # "parallel" | "autoregressive"
    temporal_ensemble_coeff: float | None = None  # ACT-style ensembling (re-plans every step) instead of a queue

    # --- architecture of a freshly built policy (a loaded checkpoint keeps its own) --------------------------------
    backbone_preset: str = "test"  # deepseek_vl2_preset name: test / tiny / small / base
    tokenizer_vocab_size: int = 512  # built byte-level BPE tokenizer size
    n_bins: int = 256
    target_sigma_bins: float = 2.0  # Gaussian soft bin targets for training (0 = one-hot cross-entropy)
    continuous_offset: bool = True
    global_view_only: bool = True
    router_prior: bool = False

    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.QUANTILES,
            "ACTION": NormalizationMode.QUANTILES,
        }
    )

    # --- training presets -------------------------------------------------------------------------------------------
    optimizer_lr: float = 1e-4
    optimizer_betas: tuple[float, float] = (0.9, 0.95)
    optimizer_weight_decay: float = 1e-2
    optimizer_grad_clip_norm: float = 1.0

    # lerobot-train --peft.*: LoRA on the routed experts too (peft target_parameters; needs --peft.lora_dropout 0)
    lora_experts: bool = False

    push_to_hub: bool = False  # offline by default (the base class defaults to True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoding not in DECODINGS:
            raise ValueError(f"dsvla: decoding must be one of {DECODINGS}, got {self.decoding!r}")
        if self.chunk_size < 1:
            raise ValueError(f"dsvla: chunk_size must be >= 1, got {self.chunk_size}")
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise ValueError(f"dsvla: n_action_steps ({self.n_action_steps}) must be in [1, chunk_size={self.chunk_size}]")
        if self.n_obs_steps != 1:
            raise ValueError(f"dsvla: only n_obs_steps=1 is supported, got {self.n_obs_steps}")

    # --- lerobot's abstract API ---------------------------------------------------------------------------------------
    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        return None

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(lr=self.optimizer_lr, betas=self.optimizer_betas, weight_decay=self.optimizer_weight_decay,
                           grad_clip_norm=self.optimizer_grad_clip_norm)

    def get_scheduler_preset(self) -> None:
        return None

    def validate_features(self) -> None:
        """One `action` output, an `observation.state` input and at least one camera (clear errors otherwise)."""
        outputs = self.output_features or {}
        inputs = self.input_features or {}
        actions = [k for k, ft in outputs.items() if ft.type is FeatureType.ACTION]
        if actions != [ACTION]:
            raise ValueError(f"dsvla needs exactly one action output feature named {ACTION!r}; output_features "
                             f"has {sorted(outputs)} (action-typed: {actions})")
        if len(self.action_feature.shape) != 1:
            raise ValueError(f"dsvla: the action feature must be a vector, got shape {tuple(self.action_feature.shape)}")
        if not self.image_features:
            raise ValueError(f"dsvla needs at least one image (VISUAL) input feature; input_features has "
                             f"{ {k: ft.type.value for k, ft in inputs.items()} }")
        if self.robot_state_feature is None:
            raise ValueError(f"dsvla needs an {OBS_STATE!r} (STATE) input feature; input_features has {sorted(inputs)}")
        if len(self.robot_state_feature.shape) != 1:
            raise ValueError(f"dsvla: {OBS_STATE!r} must be a vector, got shape {tuple(self.robot_state_feature.shape)}")

    @property
    def action_dim(self) -> int:
        return int(self.action_feature.shape[0])

    @property
    def state_dim(self) -> int:
        return int(self.robot_state_feature.shape[0])
