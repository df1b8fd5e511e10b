"""Pre/post processors of the dsvla policy, and `save_policy_for_lerobot` (a VLAPolicy trained by our own trainer
-> a folder `lerobot-eval --policy.path=DIR` runs).

The processors are lerobot's defaults: pre = rename -> add batch dim -> device -> normalize (state and action with
QUANTILES, images untouched), post = unnormalize -> cpu. Saved beside the weights they carry the normalizer stats
(`policy_preprocessor.json`, `policy_preprocessor_step_3_normalizer_processor.safetensors`,
`policy_postprocessor.json`, `policy_postprocessor_step_0_unnormalizer_processor.safetensors`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.processor import PolicyAction, PolicyProcessorPipeline, make_default_pre_post_processors
from lerobot.utils.constants import ACTION, OBS_STATE

from .configuration_dsvla import SHARED_POLICY_FIELDS, DSVLAConfig

# envs.normalize / heads.embodiment mode names -> lerobot's
LEROBOT_MODES = {
    "quantile": NormalizationMode.QUANTILES,
    "quantile10": NormalizationMode.QUANTILE10,
    "mean_std": NormalizationMode.MEAN_STD,
    "min_max": NormalizationMode.MIN_MAX,
    "identity": NormalizationMode.IDENTITY,
}


def make_dsvla_pre_post_processors(
    config: DSVLAConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
    **kwargs: Any,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    """lerobot's default policy pipelines with the config's normalization mapping (QUANTILES by default)."""
    return make_default_pre_post_processors(config, dataset_stats)


def save_policy_for_lerobot(
    vla_policy,
    out_dir: str | Path,
    embodiment_name: str,
    stats: Mapping[str, Mapping[str, Any]] | None = None,
    input_features: dict[str, PolicyFeature] | None = None,
    output_features: dict[str, PolicyFeature] | None = None,
    image_shapes: Mapping[str, tuple[int, int, int]] | None = None,
    device: str = "cpu",
    **config_overrides: Any,
) -> Path:
    """Write a lerobot-loadable checkpoint of `vla_policy` (a `vla.policy.VLAPolicy`) driving `embodiment_name`.

    The folder gets lerobot's `config.json` (type "dsvla"), the VLAPolicy files and the pre/post processors with the
    normalizer stats, so `lerobot-eval --policy.path=OUT_DIR --env.type=...` runs it.

    `stats`: {"action": {"q01": .., "q99": .., ...}, "observation.state": {...}} in raw units (a LeRobotDataset's
    `meta.stats`, or our mixture loader's per-dataset stats). Default: the stats stored in the VLAPolicy for that
    embodiment (`vla_policy.normalizer_stats[embodiment_name]`, an `envs.normalize.Normalizer` dict), whose modes
    then set the config's normalization mapping.
    `input_features` / `output_features`: lerobot features; by default derived from the embodiment (state and
    action vectors, one VISUAL feature per camera key with shape `image_shapes[key]`, default (3, 96, 96); the
    shape is informational - the policy resizes frames to its tile size).
    `config_overrides`: further DSVLAConfig fields (e.g. n_action_steps=4, temporal_ensemble_coeff=0.01).
    """
    from .modeling_dsvla import DSVLAPolicy  # local: modeling imports the whole model stack

    emb = vla_policy.registry.get(embodiment_name)
    normalization = {"VISUAL": NormalizationMode.IDENTITY, "STATE": NormalizationMode.QUANTILES,
                     "ACTION": NormalizationMode.QUANTILES}
    if stats is None:
        saved = vla_policy.normalizer_stats.get(embodiment_name)
        if saved is None:
            raise ValueError(f"no stats given and the policy stores none for {embodiment_name!r} "
                             f"(it has: {sorted(vla_policy.normalizer_stats)}); pass stats={{'action': ..., "
                             f"'observation.state': ...}}")
        stats = saved["stats"]
        modes = saved.get("modes", {})
        if ACTION in modes:
            normalization["ACTION"] = LEROBOT_MODES[modes[ACTION]]
        if OBS_STATE in modes:
            normalization["STATE"] = LEROBOT_MODES[modes[OBS_STATE]]
    for key in (ACTION, OBS_STATE):
        if key not in stats and not (key == OBS_STATE and emb.state_dim == 0):
            raise ValueError(f"stats lack {key!r} (have {sorted(stats)})")
    lerobot_stats = {key: {name: np.asarray(value, dtype=np.float32) for name, value in feature.items()}
                     for key, feature in stats.items()}

    if output_features is None:
        output_features = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(emb.action_dim,))}
    if input_features is None:
        shapes = dict(image_shapes or {})
        input_features = {cam: PolicyFeature(type=FeatureType.VISUAL, shape=tuple(shapes.get(cam, (3, 96, 96))))
                          for cam in emb.cameras}
        # the state vector as the dataset stores it (its stats' size; the policy reads the first state_dim dims)
        state_stats = [np.atleast_1d(v) for v in lerobot_stats.get(OBS_STATE, {}).values()]
        state_dim = max([emb.state_dim] + [int(v.shape[-1]) for v in state_stats[:1]])
        input_features[OBS_STATE] = PolicyFeature(type=FeatureType.STATE, shape=(state_dim,))

    vla_cfg = vla_policy.config
    fields = dict(
        {name: getattr(vla_cfg, name) for name in SHARED_POLICY_FIELDS},
        embodiment=embodiment_name,
        chunk_size=emb.chunk_len,
        n_action_steps=min(vla_cfg.n_action_steps or emb.chunk_len, emb.chunk_len),
        fps=float(emb.fps),
        normalization_mapping=normalization,
        input_features=input_features,
        output_features=output_features,
        device=device,
    )
    fields.update(config_overrides)
    config = DSVLAConfig(**fields)
    vla_cfg_backup = (vla_cfg.decoding, vla_cfg.n_action_steps, vla_cfg.temporal_ensemble_coeff)
    try:
        policy = DSVLAPolicy(config, vla_policy=vla_policy)  # validates features and the embodiment
        out_dir = Path(out_dir)
        policy.save_pretrained(out_dir)
    finally:  # the wrapper applied the lerobot config's inference settings; give the caller its policy back as it was
        vla_cfg.decoding, vla_cfg.n_action_steps, vla_cfg.temporal_ensemble_coeff = vla_cfg_backup
    preprocessor, postprocessor = make_dsvla_pre_post_processors(config, dataset_stats=lerobot_stats)
    preprocessor.save_pretrained(out_dir)
    postprocessor.save_pretrained(out_dir)
    return out_dir
