"""The policy checkpoint's layout, and finding the model in a checkpoint folder, whatever wrote it.

A policy checkpoint folder holds `policy_config.json` (POLICY_CONFIG: the policy's config, embodiment registry and
normalizer stats), `policy_head.safetensors` (POLICY_WEIGHTS: action queries, offset head, state projections, router
prior) and `backbone/` (BACKBONE_DIR: the DeepSeek-VL2 weights in the official format, with the tokenizer); a LoRA
checkpoint holds the adapter instead (vla/policy/lora.py).

`load_vl2_for_chat` (what `vla vqa` asks) reads any of these:

* An official-format DeepSeek-VL2 folder (config.json with vision/projector/language configs + safetensors), as
  released by DeepSeek or written by `vla train` / `save_deepseek_vl2`, with the tokenizer files beside it.
* A policy checkpoint written by the VLA policy (its backbone lives in the same official format).
* A LoRA checkpoint (its base with the adapters folded in).
"""

from __future__ import annotations

from pathlib import Path

from backbone.checkpoint import CheckpointError, checkpoint_folder, read_config
from backbone.deepseek_vl2 import DeepseekVL2, load_deepseek_vl2
from backbone.processor import DeepseekVL2Processor
from backbone.tokenizer import load_tokenizer

POLICY_CONFIG = "policy_config.json"
POLICY_WEIGHTS = "policy_head.safetensors"
BACKBONE_DIR = "backbone"  # sub-folder of a policy checkpoint holding the VL2 weights + tokenizer


def resolve_vl2_folder(path: str | Path) -> Path:
    """The folder holding the official-format VL2 weights for `path` (itself, or a policy's backbone folder)."""
    path = checkpoint_folder(path)  # a folder, or a hub id in the local Hugging Face cache
    if (path / BACKBONE_DIR / "config.json").is_file():
        return path / BACKBONE_DIR
    cfg = read_config(path)
    if "vision_config" not in cfg:
        raise CheckpointError(f"{path}: neither a DeepSeek-VL2 checkpoint (no vision_config in config.json) "
                              f"nor a policy checkpoint (no {BACKBONE_DIR}/ folder)")
    return path


def load_vl2_for_chat(path: str | Path) -> tuple[DeepseekVL2, DeepseekVL2Processor]:
    """Model (eval, fp32 on CPU) and processor (tokenizer from the same folder) for question answering; a LoRA
    checkpoint's model is its base with the adapters folded in (what `vla merge-lora` writes)."""
    from vla.policy.lora import is_adapter_checkpoint

    path = checkpoint_folder(path)
    if is_adapter_checkpoint(path):
        from vla.policy.model import VLAPolicy

        policy = VLAPolicy.load(path, merge_adapters=True)
        return policy.backbone.eval(), DeepseekVL2Processor(policy.tokenizer, policy.backbone.config.processor_config())
    folder = resolve_vl2_folder(path)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json beside the weights (save the tokenizer with the model)")
    model = load_deepseek_vl2(folder)
    tokenizer = load_tokenizer(folder)
    if len(tokenizer) > model.config.language.vocab_size:
        raise CheckpointError(f"{folder}: tokenizer has {len(tokenizer)} tokens, the model's vocabulary only "
                              f"{model.config.language.vocab_size}")
    return model, DeepseekVL2Processor(tokenizer, model.config.processor_config())
