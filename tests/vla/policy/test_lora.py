"""LoRA through peft on a VLAPolicy: which layers are adapted, the adapter checkpoint round trip (save -> load ->
merge -> official-format folder) gives the same actions, and clear errors for a target that matches nothing and an
adapter put on another base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import helpers
from backbone.deepseek_vl2 import load_deepseek_vl2
from heads.embodiment import Embodiment
from vla.policy.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraError, apply_lora, is_lora, make_lora_config, merge_lora,
                             new_token_ids, save_adapter, trainable_count)
from vla.policy import BACKBONE_DIR, VLAPolicy

IMAGE, STATE = "observation.image", "observation.state"


def tiny_policy(seed: int = 0) -> VLAPolicy:
    return helpers.tiny_policy([Embodiment("pusht", action_dim=2, state_dim=2, cameras=(IMAGE,), fps=10, chunk_len=4)],
                               seed=seed).eval()


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
    from vla.policy.lora import load_adapter_policy

    with pytest.raises(LoraError, match="does not match the adapter"):
        load_adapter_policy(tmp_path / "adapter", base=other)
    from backbone.checkpoint import CheckpointError

    (tmp_path / "adapter" / ADAPTER_WEIGHTS).write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=f"{ADAPTER_WEIGHTS}: corrupt or truncated"):
        VLAPolicy.load(tmp_path / "adapter")


def test_lora_on_the_routed_experts_is_a_rank_r_update_per_expert(base_dir, tmp_path):
    """`experts=True`: peft's target_parameters on GroupedExperts' fused (E, out, in) weights; the adapted layer
    computes our grouped forward with W_e + (alpha / r) B_e A_e for every expert e (checked against that forward on the
    summed weights), trains, and survives save -> load -> merge."""
    from peft.tuners.lora import ParamWrapper

    from backbone.moe import GroupedExperts

    policy = VLAPolicy.load(base_dir)
    config = make_lora_config(policy, r=4, experts=True)
    layers = [n for n, m in policy.named_modules() if isinstance(m, GroupedExperts)]
    assert layers and sorted(config.target_parameters) == sorted(f"{n}.{p}" for n in layers for p in ("gate_up_proj", "down_proj"))
    apply_lora(policy, config)
    perturb_trainable(policy)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert any(".mlp.experts." in n and ".lora_B." in n for n in trainable)
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in trainable)  # the experts' own weights stay frozen

    outer = dict(policy.named_modules())[layers[0]]
    assert isinstance(outer, ParamWrapper) and isinstance(outer.get_base_layer(), GroupedExperts)
    experts = outer.get_base_layer()
    reference = GroupedExperts(*experts.gate_up_proj.shape[:1], experts.down_proj.shape[1], experts.down_proj.shape[2])
    with torch.no_grad():
        for wrapper in (outer, outer.base_layer):
            name = wrapper.parameter_name
            E, r = wrapper.num_experts, wrapper.r["default"]
            A = wrapper.lora_A["default"].weight.reshape(E, r, -1)  # (E, r, in)
            B = wrapper.lora_B["default"].weight.reshape(-1, r, E).permute(2, 0, 1)  # (E, out, r)
            getattr(reference, name).copy_(getattr(experts, name) + wrapper.scaling["default"] * B @ A)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, experts.down_proj.shape[1], generator=g)
    ids, weights = torch.randint(0, experts.gate_up_proj.shape[0], (9, 2), generator=g), torch.rand(9, 2, generator=g)
    torch.testing.assert_close(outer(x, ids, weights), reference(x, ids, weights), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(experts(x, ids, weights), reference(x, ids, weights))  # the update does something

    policy.train()
    loss, _ = policy(batch() | {"action": torch.rand(2, 4, 2) * 2 - 1, "action_is_pad": torch.zeros(2, 4, dtype=torch.bool)})
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in policy.named_parameters() if ".mlp.experts." in n and ".lora_" in n)
    policy.eval()
    expected = policy.predict_action_chunk(batch())
    save_adapter(policy, tmp_path / "adapter", base=str(base_dir))
    loaded = VLAPolicy.load(tmp_path / "adapter")
    torch.testing.assert_close(loaded.predict_action_chunk(batch()), expected, atol=1e-5, rtol=1e-5)
    merged = merge_lora(loaded)
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged.predict_action_chunk(batch()), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(LoraError, match="routed experts takes no dropout"):
        make_lora_config(VLAPolicy.load(base_dir), experts=True, dropout=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# vla train ... peft.method=lora, resume, vla merge-lora
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nav_data(robot_data):
    return robot_data / "nav"


def _train(data, out, steps, *extra):
    from vla.config import load_config
    from vla.train import run

    torch.set_num_threads(1)
    return run(load_config("train", [
        "stage=vla", f"out={out}", f"stage.steps={steps}", "micro_batch=2", "checkpoint.every=1", "log.progress=false",
        "log.tensorboard=false", "log.plot=false", "stage.optim.lr=3e-3", "stage.schedule.kind=constant",
        "stage.schedule.warmup_steps=0", "model.language={hidden_size: 64, num_hidden_layers: 2}",
        f"stage.data={{datasets: [{{root: '{data}'}}], chunk_len: 4}}", *extra]))


@pytest.mark.parametrize("experts", ["false", "true"])
def test_vla_train_lora_saves_the_adapter_resumes_and_merges(nav_data, tmp_path, capsys, experts):
    from vla.cli import main

    base = _train(nav_data, tmp_path / "full", 1)["checkpoint"]
    lora = ["peft.method=lora", "peft.r=4", f"init_from={base}", f"peft.experts={experts}"]
    straight = _train(nav_data, tmp_path / "lora", 3, *lora)
    ckpt = Path(straight["checkpoint"])
    names = {p.name for p in ckpt.iterdir()}
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= names and BACKBONE_DIR not in names
    assert straight["losses"][3] != straight["losses"][1]  # it trains
    from safetensors import safe_open

    with safe_open(str(ckpt / ADAPTER_WEIGHTS), framework="pt") as f:  # the routed experts' pairs with peft.experts
        assert any(".mlp.experts." in key for key in f.keys()) == (experts == "true")
    adapter_bytes = (ckpt / ADAPTER_WEIGHTS).stat().st_size
    full_bytes = sum(p.stat().st_size for p in Path(base).rglob("*.safetensors"))
    assert adapter_bytes < full_bytes

    # resume from step 2 continues the same trajectory
    _train(nav_data, tmp_path / "part", 2, *lora)
    resumed = _train(nav_data, tmp_path / "part", 3, *lora, "resume=true")
    assert resumed["losses"][3] == pytest.approx(straight["losses"][3], abs=1e-5)

    # vla merge-lora: a full policy folder (official-format backbone) with the same actions
    out = tmp_path / "merged"
    assert main(["merge-lora", str(ckpt), f"out={out}"]) == 0
    assert "vla merge-lora" in capsys.readouterr().out
    assert load_deepseek_vl2(out / BACKBONE_DIR) is not None
    import envs  # noqa: F401  (registers the built-in envs)
    import gymnasium as gym

    env = gym.make("vla/PointNav-v0", image_size=32)
    obs, _ = env.reset(seed=0)
    adapter_policy, merged = VLAPolicy.load(ckpt), VLAPolicy.load(out)
    camera = next(iter(adapter_policy.registry)).cameras[0]
    image = torch.as_tensor(next(iter(obs["pixels"].values()))).permute(2, 0, 1)[None].float() / 255
    b = {camera: image, STATE: torch.zeros(1, 2), "task": ["go"], "embodiment": adapter_policy.registry.names()[0]}
    torch.testing.assert_close(merged.predict_action_chunk(b), adapter_policy.predict_action_chunk(b), atol=1e-5, rtol=1e-5)
    # what rollouts and `vla serve` load: the adapter folded into its base on loading, the same actions
    folded = VLAPolicy.load(ckpt, merge_adapters=True)
    assert is_lora(adapter_policy) and not is_lora(folded) and not any(".lora_" in n for n, _ in folded.named_parameters())
    torch.testing.assert_close(folded.predict_action_chunk(b), adapter_policy.predict_action_chunk(b), atol=1e-5, rtol=1e-5)

    # the adapter checkpoint still answers questions: its base with the adapters folded in, as the merged folder
    from vla.policy.checkpoint import load_vl2_for_chat

    (chat, processor), (chat_merged, _) = load_vl2_for_chat(ckpt), load_vl2_for_chat(out)
    assert not any(".lora_" in n for n, _ in chat.named_parameters())
    ids = torch.tensor([processor.tokenizer.encode("How many shapes are there?")])
    torch.testing.assert_close(chat.language(input_ids=ids).logits, chat_merged.language(input_ids=ids).logits,
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(chat.language(input_ids=ids).logits,  # the adapters changed the base's answers
                              load_vl2_for_chat(base)[0].language(input_ids=ids).logits)
    from PIL import Image

    Image.fromarray(next(iter(obs["pixels"].values()))).save(tmp_path / "scene.png")
    capsys.readouterr()
    assert main(["vqa", f"checkpoint={ckpt}", f"image={tmp_path / 'scene.png'}", "question=How many shapes?",
                 "max_new_tokens=3"]) == 0 and capsys.readouterr().out.strip()


def test_vla_train_lora_errors_are_one_line(nav_data, tmp_path):
    from vla.train.stages import StageTaskError

    with pytest.raises(StageTaskError, match="set init_from"):
        _train(nav_data, tmp_path / "a", 1, "peft.method=lora")
    with pytest.raises(StageTaskError, match="stage=vla only"):
        from vla.config import load_config
        from vla.train import run

        run(load_config("train", ["stage=sft", f"out={tmp_path / 'b'}", "stage.steps=1", "stage.data.generate=4",
                                  "peft.method=lora", "log.progress=false"]))


@pytest.mark.parametrize("mode, experts", [("fsdp", "false"), ("fsdp", "true")])
def test_vla_train_lora_two_processes_match_one(nav_data, tmp_path, mode, experts):
    """LoRA under torchrun (gloo, FSDP2; with the routed experts adapted too): the same losses as one process."""
    from helpers import two_processes_match_one

    base = _train(nav_data, tmp_path / "full", 1)["checkpoint"]
    common = ["stage=vla", "stage.steps=3", "checkpoint.every=0", "log.progress=false", "log.tensorboard=false",
              "log.plot=false", "stage.optim.lr=3e-3", "stage.schedule.kind=constant", "stage.schedule.warmup_steps=0",
              "model.language={hidden_size: 64, num_hidden_layers: 2}",
              f"stage.data={{datasets: [{{root: '{nav_data}'}}], chunk_len: 4}}",
              "peft.method=lora", "peft.r=4", f"peft.experts={experts}", f"init_from={base}"]
    two_processes_match_one(tmp_path, common, mode)
