"""LoRA through peft on a VLAPolicy: which layers are adapted, the adapter checkpoint round trip (save -> load ->
merge -> official-format folder) gives the same actions, and clear errors for a target that matches nothing and an
adapter put on another base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backbone.deepseek_vl2 import load_deepseek_vl2
from backbone.tokenizer import build_bpe_tokenizer
from heads.embodiment import Embodiment, EmbodimentRegistry
from vla.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraError, apply_lora, is_lora, make_lora_config, merge_lora,
                      new_token_ids, save_adapter, trainable_count)
from vla.policy import BACKBONE_DIR, VLAPolicy, VLAPolicyConfig, build_policy

IMAGE, STATE = "observation.image", "observation.state"


def tiny_policy(seed: int = 0) -> VLAPolicy:
    torch.manual_seed(seed)
    emb = Embodiment("pusht", action_dim=2, state_dim=2, cameras=(IMAGE,), fps=10, chunk_len=4)
    return build_policy(VLAPolicyConfig(max_chunk_len=8, max_action_dim=4), EmbodimentRegistry([emb]),
                        build_bpe_tokenizer(vocab_size=300), "test").eval()


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {IMAGE: torch.rand(2, 3, 64, 64, generator=g), STATE: torch.rand(2, 2, generator=g) * 2 - 1,
            "task": ["push the T", "push it"], "embodiment": "pusht"}


def perturb_trainable(policy: VLAPolicy, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "base"
    tiny_policy().save(path)
    return path


def test_lora_adapts_the_named_layers_and_trains_the_extras(base_dir):
    policy = VLAPolicy.load(base_dir)
    config = make_lora_config(policy, r=4)
    targets = set(config.target_modules)
    assert "backbone.language.model.layers.0.self_attn.q_proj" in targets
    assert "backbone.language.model.layers.0.mlp.gate_proj" in targets  # dense MLP
    assert "backbone.language.model.layers.1.mlp.shared_experts.down_proj" in targets
    assert "backbone.vision_encoder.projector.layers.0" in targets
    assert not any("vision_encoder.vision." in t or ".mlp.experts" in t or ".mlp.gate" == t[-9:] for t in targets)
    apply_lora(policy, config)
    assert is_lora(policy)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable)
    assert any(n.startswith("queries.modules_to_save.") for n in trainable)
    assert any("embed_tokens.token_adapter.trainable_tokens_delta" in n for n in trainable)
    assert any("lm_head.token_adapter.trainable_tokens_delta" in n for n in trainable)
    assert not any(n.endswith("embed_tokens.base_layer.weight") or ".experts." in n or "vision_model" in n
                   for n in trainable)  # the whole embedding, routed experts and the vision tower stay frozen
    count, total = trainable_count(policy)
    assert 0 < count < total
    # the loss reaches the adapters and the new token rows
    policy.train()
    b = batch() | {"action": torch.rand(2, 4, 2) * 2 - 1, "action_is_pad": torch.zeros(2, 4, dtype=torch.bool)}
    loss, _ = policy(b)
    loss.backward()
    delta = dict(policy.named_parameters())["backbone.language.lm_head.token_adapter.trainable_tokens_delta.default"]
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert len(new_token_ids(policy)) == delta.shape[0]


def test_adapter_save_load_merge_round_trip(base_dir, tmp_path):
    policy = VLAPolicy.load(base_dir)
    apply_lora(policy, make_lora_config(policy, r=4))
    perturb_trainable(policy)
    policy.eval()
    expected = policy.predict_action_chunk(batch())
    assert not torch.allclose(expected, VLAPolicy.load(base_dir).predict_action_chunk(batch()))

    save_adapter(policy, tmp_path / "adapter", base=str(base_dir))
    assert (tmp_path / "adapter" / ADAPTER_CONFIG).is_file() and (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
    assert not (tmp_path / "adapter" / BACKBONE_DIR).exists()  # only the adapter and the trained extras
    loaded = VLAPolicy.load(tmp_path / "adapter")
    assert is_lora(loaded)
    torch.testing.assert_close(loaded.predict_action_chunk(batch()), expected, atol=1e-5, rtol=1e-5)

    merged = merge_lora(loaded)
    assert not is_lora(merged) and not any(".lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged.predict_action_chunk(batch()), expected, atol=1e-5, rtol=1e-5)
    merged.save(tmp_path / "merged")
    assert load_deepseek_vl2(tmp_path / "merged" / BACKBONE_DIR) is not None  # official format
    reloaded = VLAPolicy.load(tmp_path / "merged")
    torch.testing.assert_close(reloaded.predict_action_chunk(batch()), expected, atol=1e-5, rtol=1e-5)


def test_lora_errors_are_clear(base_dir, tmp_path):
    policy = VLAPolicy.load(base_dir)
    with pytest.raises(LoraError, match="'not_a_layer' matches no linear layer"):
        make_lora_config(policy, targets=["q_proj", "not_a_layer"])
    apply_lora(policy, make_lora_config(policy, r=4))
    save_adapter(policy, tmp_path / "adapter", base=str(base_dir))
    other = tmp_path / "other_base"
    tiny_policy(seed=5).save(other)
    from vla.lora import load_adapter_policy

    with pytest.raises(LoraError, match="does not match the adapter"):
        load_adapter_policy(tmp_path / "adapter", base=other)
