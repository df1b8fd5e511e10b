"""LeRobot policy checkpoints acting in our gymnasium envs: `vla eval policy=lerobot:DIR env=... episodes=N`.

DIR is what `lerobot-train` writes: a `pretrained_model` folder (`config.json` with the policy type and the input /
output features recorded from the training dataset, `model.safetensors`, and the saved pre/post-processors
`policy_preprocessor.json` / `policy_postprocessor.json` with their normalization stats), a checkpoint step folder
holding one, or the run's output folder (its `checkpoints/last/pretrained_model`). Any registered policy type loads
(ACT, Diffusion Policy, ..., and the `lerobot_policy_*` plugins, ours included); a PEFT adapter checkpoint loads on
its recorded base, as `lerobot-eval` does.

Each step goes the way `lerobot-eval` sends it: lerobot's `preprocess_observation` (uint8 HWC frames -> float CHW in
[0, 1] as `observation.images.<camera>`, `agent_pos` -> `observation.state`), the task strings, the checkpoint's
preprocessor (normalization with the training stats, batch, device), `policy.select_action` (the policy's own action
queue / observation history; `reset()` between batches of episodes), its postprocessor (back to the robot's units).
The rollout loop, seeds, videos and tables are `envs.rollout.evaluate`'s, the same as for our policies.

Features are mapped by what the checkpoint records: a camera feature `observation.images.<name>` takes the env's
camera `<name>`; `observation.image` (one unnamed camera) takes the env's only camera. Every recorded input must come
from the env with the recorded shape (cameras (3, H, W), state (n,)) and the recorded action size must be the env's;
cameras the checkpoint does not use are dropped. A mismatch (missing camera, other image size, state or action
size, an input the env does not give) is one ValueError line naming both sides. `vla eval` with `image_size=null`
(the default) renders the built-in envs at the size the checkpoint records.

Options (`policy_options={...}`): `device` (default cpu); `config` ({field: value}): inference-time changes of the
checkpoint's config, parsed as `lerobot-eval --policy.<field>=<value>` parses them (e.g. Diffusion Policy's
`{noise_scheduler_type: DDIM, num_inference_steps: 10}`, ACT's `{n_action_steps: 1, temporal_ensemble_coeff: 0.01}`);
an unknown field is one error line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.rollout import PolicyContext, to_lerobot_observation

PREFIX = "lerobot"
CONFIG = "config.json"
IMAGE_PREFIX, SINGLE_IMAGE, STATE, ACTION = "observation.images.", "observation.image", "observation.state", "action"


def resolve_checkpoint(path: str | Path) -> Path:
    """A lerobot-train output folder, a checkpoint step folder or a `pretrained_model` folder -> the folder holding
    the policy's `config.json`. A path that is none of these is a FileNotFoundError naming what was looked for."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"lerobot checkpoint {root} does not exist")
    for candidate in (root, root / "pretrained_model", root / "checkpoints" / "last" / "pretrained_model"):
        if (candidate / CONFIG).is_file():
            return candidate
    raise FileNotFoundError(f"{root} is not a LeRobot policy checkpoint: no {CONFIG} in it, in pretrained_model/ or "
                            f"in checkpoints/last/pretrained_model/ (what lerobot-train writes)")


def recorded_features(path: str | Path) -> dict[str, dict[str, Any]]:
    """The checkpoint's features as its config.json records them: {key: {"type": ..., "shape": [...]}}, inputs and
    outputs together (read without building the policy)."""
    config = json.loads((resolve_checkpoint(path) / CONFIG).read_text())
    return {**(config.get("input_features") or {}), **(config.get("output_features") or {})}


def recorded_image_size(path: str | Path) -> int | None:
    """The square camera size the checkpoint was trained on (None: no cameras, or not square / not one size)."""
    sizes = {tuple(f["shape"][-2:]) for f in recorded_features(path).values() if f.get("type") == "VISUAL"}
    if len(sizes) != 1:
        return None
    height, width = next(iter(sizes))
    return int(height) if height == width else None


def _env_inputs(observation_space) -> dict[str, tuple[int, ...]]:
    """What `preprocess_observation` makes of one env observation: lerobot key -> shape (images channel-first)."""
    inputs: dict[str, tuple[int, ...]] = {}
    pixels = observation_space["pixels"] if "pixels" in observation_space.spaces else None
    if pixels is not None:
        cameras = pixels.spaces if hasattr(pixels, "spaces") else {None: pixels}
        for camera, space in cameras.items():
            height, width, channels = space.shape
            inputs[SINGLE_IMAGE if camera is None else IMAGE_PREFIX + camera] = (channels, height, width)
    if "agent_pos" in observation_space.spaces:
        inputs[STATE] = tuple(observation_space["agent_pos"].shape)
    if "environment_state" in observation_space.spaces:
        inputs["observation.environment_state"] = tuple(observation_space["environment_state"].shape)
    return inputs


def feature_mapping(features: dict[str, dict[str, Any]], observation_space, action_shape: tuple[int, ...],
                    where: str) -> dict[str, str]:
    """{checkpoint input key: env observation key} for every input the checkpoint records; ValueError (one line,
    `where` names the checkpoint and the env) when the env cannot give one of them or gives another shape, or when
    the recorded action size is not the env's."""
    given = _env_inputs(observation_space)
    env_cameras = [key for key in given if key.startswith((IMAGE_PREFIX, SINGLE_IMAGE))]
    described = ", ".join(f"{k} {list(v)}" for k, v in given.items())
    mapping: dict[str, str] = {}
    problems: list[str] = []
    for key, feature in features.items():
        kind, shape = feature.get("type"), tuple(int(d) for d in feature.get("shape", ()))
        if kind == "ACTION":
            if shape != tuple(action_shape):
                problems.append(f"{key} {list(shape)} but the env's actions are {list(action_shape)}")
            continue
        source = key
        if key == SINGLE_IMAGE and key not in given and len(env_cameras) == 1:
            source = env_cameras[0]  # one unnamed camera: the env's only one
        if source not in given:
            problems.append(f"needs {key} {list(shape)}, which the env does not give")
        elif given[source] != shape:
            problems.append(f"{key} {list(shape)} but the env gives {list(given[source])}"
                            + (" (set image_size)" if kind == "VISUAL" else ""))
        else:
            mapping[key] = source
    if not any(f.get("type") == "ACTION" for f in features.values()):
        problems.append("records no action feature")
    if problems:
        raise ValueError(f"{where}: the checkpoint's features do not match the env: {'; '.join(problems)} "
                         f"(the env gives {described}; actions {list(action_shape)})")
    return mapping


def cli_value(value: Any) -> str:
    """A plain value as lerobot's command line (draccus) reads it: null, true / false, [1, 2], text."""
    if value is None or isinstance(value, (bool, list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


def load_lerobot_policy(path: str | Path, device: str = "cpu", overrides: dict[str, Any] | None = None):
    """(policy in eval mode, preprocessor, postprocessor, config) of a LeRobot checkpoint folder, nothing downloaded;
    `overrides` change fields of its config before the policy is built (as `--policy.<field>=<value>` would)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors
    from lerobot.utils.import_utils import register_third_party_plugins

    folder = resolve_checkpoint(path)
    register_third_party_plugins()  # lerobot_policy_* packages (ours: dsvla) register their policy types
    policy_type = json.loads((folder / CONFIG).read_text()).get("type")
    try:
        known = {f.name for f in dataclasses.fields(PreTrainedConfig.get_choice_class(policy_type))}
    except Exception:  # noqa: BLE001 - draccus raises its own errors for unknown choices
        raise ValueError(f"lerobot checkpoint {folder}: policy type {policy_type!r} is not registered (known: "
                         f"{', '.join(sorted(PreTrainedConfig.get_known_choices()))})") from None
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ValueError(f"lerobot checkpoint {folder}: its {policy_type} config has no field(s) {unknown}")
    args = [f"--{field}={cli_value(value)}" for field, value in (overrides or {}).items()]
    try:
        config = PreTrainedConfig.from_pretrained(folder, cli_overrides=args)
    except SystemExit as error:  # draccus exits on a field the config does not have
        raise ValueError(f"lerobot checkpoint {folder}: cannot apply config {overrides} ({error})") from None
    config.pretrained_path = str(folder)
    config.device = device
    policy_class = get_policy_class(config.type)
    if getattr(config, "use_peft", False):  # an adapter folder: base policy + adapter, as lerobot-eval loads it
        from peft import PeftConfig, PeftModel

        adapter = PeftConfig.from_pretrained(str(folder))
        base = policy_class.from_pretrained(adapter.base_model_name_or_path, config=config)
        policy = PeftModel.from_pretrained(base, str(folder), config=adapter)
    else:
        policy = policy_class.from_pretrained(str(folder), config=config)
    policy.to(device).eval()
    preprocessor, postprocessor = make_pre_post_processors(
        policy_cfg=config, pretrained_path=str(folder),
        preprocessor_overrides={"device_processor": {"device": device}})
    return policy, preprocessor, postprocessor, config


class LeRobotEnvPolicy:
    """A LeRobot policy behind envs.rollout's policy protocol (see the module docstring for the path of a step)."""

    def __init__(self, policy, preprocessor, postprocessor, mapping: dict[str, str]):
        self.policy, self.preprocessor, self.postprocessor = policy, preprocessor, postprocessor
        self.mapping = mapping

    def reset(self) -> None:
        self.policy.reset()

    def select_action(self, observation: dict[str, Any]) -> np.ndarray:
        converted = to_lerobot_observation(observation)
        batch: dict[str, Any] = {key: converted[source] for key, source in self.mapping.items()}
        batch["task"] = converted["task"]
        batch = self.preprocessor(batch)
        with torch.inference_mode():
            action = self.policy.select_action(batch)
        action = self.postprocessor(action)
        return action.detach().to("cpu", torch.float32).numpy()


def _lerobot_factory(argument: str, context: PolicyContext) -> LeRobotEnvPolicy:
    path = argument or context.options.get("checkpoint")
    if not path:
        raise ValueError("policy=lerobot:DIR needs a LeRobot checkpoint folder (lerobot-train's pretrained_model)")
    folder = resolve_checkpoint(path)
    if context.observation_space is None:
        raise ValueError(f"policy=lerobot:{path}: the env's observation space is unknown, so its features cannot be mapped")
    mapping = feature_mapping(recorded_features(folder), context.observation_space, tuple(context.action_space.shape),
                              f"policy=lerobot:{path} in {context.env_id}")
    device = str(context.options.get("device") or "cpu")
    overrides = dict(context.options.get("config") or {})
    cache = context.options.setdefault("_loaded_policies", {})
    key = (PREFIX, str(folder), device, json.dumps(overrides, sort_keys=True, default=str))
    if key not in cache:  # one load per eval run, shared by the envs
        cache[key] = load_lerobot_policy(folder, device, overrides)
    policy, preprocessor, postprocessor, _ = cache[key]
    return LeRobotEnvPolicy(policy, preprocessor, postprocessor, mapping)

