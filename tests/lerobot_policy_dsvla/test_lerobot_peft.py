"""`lerobot-train` on a local LeRobotDataset with a fresh dsvla policy, then with `--peft.method_type=LORA` from its
checkpoint (the plugin's `_get_default_peft_targets`), and `lerobot-eval` on both results (PushT, short episodes);
the real commands, as a user runs them (~30 s here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASK = "Push the T-shaped block onto the T-shaped target."
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _exe(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def write_pusht_like_dataset(root: Path, episodes: int = 2, length: int = 12) -> Path:
    """A local LeRobotDataset with PushT's features (observation.image 96x96, observation.state (2,), action (2,))."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {"observation.image": {"dtype": "image", "shape": (96, 96, 3), "names": ["height", "width", "channels"]},
                "observation.state": {"dtype": "float32", "shape": (2,), "names": None},
                "action": {"dtype": "float32", "shape": (2,), "names": None}}
    dataset = LeRobotDataset.create("local/pusht_tiny", fps=10, features=features, root=root, robot_type="pusht",
                                    use_videos=False)
    rng = np.random.default_rng(0)
    for _ in range(episodes):
        for _ in range(length):
            dataset.add_frame({"observation.image": rng.integers(0, 255, (96, 96, 3), dtype=np.uint8),
                               "observation.state": rng.uniform(0, 512, 2).astype(np.float32),
                               "action": rng.uniform(0, 512, 2).astype(np.float32), "task": TASK})
        dataset.save_episode()
    dataset.finalize()
    return root


def run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def train(dataset: Path, out: Path, *args: str) -> Path:
    run([_exe("lerobot-train"), "--dataset.repo_id=local/pusht_tiny", f"--dataset.root={dataset}",
         "--policy.device=cpu", "--policy.push_to_hub=false", "--steps=2", "--batch_size=2", "--save_freq=2",
         "--log_freq=1", "--num_workers=0", "--wandb.enable=false", f"--output_dir={out}", *args], out.parent)
    return out / "checkpoints" / "last" / "pretrained_model"


def evaluate(checkpoint: Path, out: Path) -> dict:
    run([_exe("lerobot-eval"), f"--policy.path={checkpoint}", "--env.type=pusht", "--env.episode_length=8",
         "--eval.n_episodes=1", "--eval.batch_size=1", "--eval.use_async_envs=false", "--policy.device=cpu",
         f"--output_dir={out}"], out.parent)
    return json.loads((out / "eval_info.json").read_text())


def test_lerobot_train_with_and_without_peft_then_eval(tmp_path):
    dataset = write_pusht_like_dataset(tmp_path / "dataset")
    full = train(dataset, tmp_path / "full", "--policy.type=dsvla", "--policy.tokenizer_vocab_size=300",
                 "--policy.chunk_size=4", "--policy.n_action_steps=4", "--policy.embodiment=pusht")
    assert (full / "backbone").is_dir() and (full / "config.json").is_file()
    assert evaluate(full, tmp_path / "eval_full")["overall"]["n_episodes"] == 1

    lora = train(dataset, tmp_path / "lora", f"--policy.path={full}", "--peft.method_type=LORA", "--peft.r=4")
    names = {p.name for p in lora.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "config.json"} <= names
    assert "backbone" not in names and "policy_head.safetensors" not in names  # the adapter and extras only
    adapter = json.loads((lora / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(full) and adapter["r"] == 4
    assert set(adapter["modules_to_save"]) >= {"model.queries", "model.offset_head", "model.state_proj"}
    assert set(adapter["trainable_token_indices"]) == {"model.backbone.language.model.embed_tokens",
                                                      "model.backbone.language.lm_head"}
    from safetensors.torch import load_file

    weights = load_file(str(lora / "adapter_model.safetensors"))
    assert any(".lora_A." in k for k in weights) and any("trainable_tokens_delta" in k for k in weights)
    assert evaluate(lora, tmp_path / "eval_lora")["overall"]["n_episodes"] == 1


def test_default_peft_targets_and_clear_target_error():
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_policy_config
    from peft import LoraConfig

    from lerobot_policy_dsvla import DSVLAPolicy
    from vla.policy.lora import LoraError

    cfg = make_policy_config("dsvla", embodiment="pusht", chunk_size=4, n_action_steps=4, tokenizer_vocab_size=300,
                             device="cpu", pretrained_path="some/base",
                             input_features={"observation.image": PolicyFeature(FeatureType.VISUAL, (3, 96, 96)),
                                             "observation.state": PolicyFeature(FeatureType.STATE, (2,))},
                             output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))})
    torch.manual_seed(0)
    policy = DSVLAPolicy(cfg)
    targets = policy._get_default_peft_targets()
    assert "model.backbone.language.model.layers.0.self_attn.kv_b_proj" in targets["target_modules"]
    assert not any(".experts" in t or "vision_model" in t for t in targets["target_modules"])
    assert "model.queries" in targets["modules_to_save"]
    policy._validate_peft_config(LoraConfig(target_modules=["q_proj", "o_proj"]))
    with pytest.raises(LoraError, match="'qkv' matches no linear layer"):
        policy._validate_peft_config(LoraConfig(target_modules=["q_proj", "qkv"]))
    assert "target_parameters" not in targets
    policy.config.lora_experts = True  # --policy.lora_experts=true: the routed experts' fused weights too
    experts = policy._get_default_peft_targets()["target_parameters"]
    assert "model.backbone.language.model.layers.1.mlp.experts.gate_up_proj" in experts
    assert len(experts) == 2 * sum(type(m).__name__ == "GroupedExperts" for m in policy.model.modules())
