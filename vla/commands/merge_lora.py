"""`vla merge-lora CKPT out=DIR [base=BASE]`: fold a LoRA checkpoint of `vla train ... peft.method=lora` into its
base and write a full policy folder: `policy_config.json`, `policy_head.safetensors` and `backbone/`, an
official-format DeepSeek-VL2 checkpoint (with the tokenizer that holds the action tokens) that `load_deepseek_vl2`
reads. `VLAPolicy.load(DIR)` gives the same actions as the adapter checkpoint; `vla eval`, `vla serve`, `vla vqa`
and lerobot (through `save_policy_for_lerobot`) read it like any policy checkpoint.
"""

from __future__ import annotations

from pathlib import Path


def main(cfg) -> int:
    from vla.policy.lora import is_adapter_checkpoint, load_adapter_policy, merge_lora, trainable_count

    checkpoint, out = Path(str(cfg.checkpoint)), Path(str(cfg.out))
    if not is_adapter_checkpoint(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: not a LoRA checkpoint (no adapter_config.json + adapter_model.safetensors)")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"{out} exists and is not empty; pass overwrite=true")
    policy = load_adapter_policy(checkpoint, base=cfg.get("base"))
    merged = merge_lora(policy)
    merged.save(out)
    _, total = trainable_count(merged)
    print(f"vla merge-lora: {checkpoint} + its base -> {out} ({total:,} parameters; backbone/ is official format)")
    return 0
