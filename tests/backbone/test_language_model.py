"""The language model against oracles: transformers' DeepseekV2ForCausalLM, hand-written references, and itself
(cached decode vs full forward, grouped dispatch vs the per-expert loop)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from backbone.attention import MultiHeadAttention, attention_inputs
from backbone.checkpoint import CheckpointError, load_language_model, save_language_model, write_checkpoint
from backbone.config import LanguageModelConfig, language_preset, tiny_test_config
from backbone.convert import language_to_official
from backbone.language_model import build_language_model
from backbone.moe import MoE, RouterOutput, balance_aux_loss


def hf_model(topk_method: str, n_group: int = 1, topk_group: int = 1, q_lora_rank=None):
    """transformers' reference model; the tests that use it skip where transformers is missing (only they need it)."""
    pytest.importorskip("transformers")
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(
        vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=q_lora_rank, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
        first_k_dense_replace=1, topk_method=topk_method, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=1.5, max_position_embeddings=128, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers inits some weights to zero/one; randomize everything for a real check
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    for layer in model.model.layers:
        # transformers 5.5's group_limited_greedy reads `self.num_experts`, which its MoE never sets.
        if hasattr(layer.mlp, "experts"):
            layer.mlp.num_experts = cfg.n_routed_experts
    return model


@pytest.mark.parametrize("topk_method,n_group,topk_group,q_lora", [
    ("greedy", 1, 1, None), ("group_limited_greedy", 4, 2, None), ("greedy", 1, 1, 24)])
def test_parity_with_transformers(tmp_path, topk_method, n_group, topk_group, q_lora):
    hf = hf_model(topk_method, n_group, topk_group, q_lora)
    hf.save_pretrained(tmp_path)
    ours = load_language_model(tmp_path)
    assert ours.config.use_mla and ours.config.n_group == n_group
    ids = torch.randint(0, 160, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids).logits
    assert (got - ref).abs().max().item() < 1e-4


def test_official_naming_and_vl2_prefix(tmp_path):
    """A DeepSeek-VL2-style file (`language.` prefix, language_config, extra vision keys) loads the same model."""
    hf = hf_model("greedy")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_language_model(tmp_path / "hf")
    state = {f"language.{k}": v for k, v in language_to_official(ours.state_dict()).items()}
    state["vision.pos_embed"] = torch.zeros(1, 4, 8)
    write_checkpoint(tmp_path / "vl2", {"language_config": ours.config.to_dict(), "model_type": "deepseek_vl_v2"}, state)
    again = load_language_model(tmp_path / "vl2")
    ids = torch.randint(0, 160, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)


def test_save_load_round_trip_sharded(tmp_path):
    cfg = tiny_test_config(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.0)
    model = build_language_model(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate.e_score_correction_bias.normal_()
    save_language_model(model, tmp_path / "a")
    keys = set(json.loads((tmp_path / "a" / "config.json").read_text()))
    assert {"n_routed_experts", "kv_lora_rank", "topk_method"} <= keys
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    # sharded copy with an index
    write_checkpoint(tmp_path / "b", model.config.to_dict(), language_to_official(model.state_dict()), max_shard_bytes=100_000)
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
        for sub in ("a", "b"):
            assert torch.equal(load_language_model(tmp_path / sub)(ids).logits, ref)


def test_loading_errors_name_the_culprit(tmp_path):
    model = build_language_model(tiny_test_config())
    save_language_model(model, tmp_path / "ok")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "ok" / "model.safetensors"))
    cfg = (tmp_path / "ok" / "config.json").read_text()

    def variant(name, mutate):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg)
        s = dict(state)
        mutate(s)
        save_file(s, str(d / "model.safetensors"))
        return d

    d = variant("missing", lambda s: s.pop("model.layers.0.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match="kv_b_proj"):
        load_language_model(d)
    d = variant("extra", lambda s: s.__setitem__("model.layers.0.mystery.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="mystery"):
        load_language_model(d)
    d = variant("shape", lambda s: s.__setitem__("model.norm.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(3,\)"):
        load_language_model(d)
    d = variant("expert", lambda s: s.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match="experts"):
        load_language_model(d)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(cfg)
    raw = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_language_model(corrupt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_language_model(tmp_path / "empty")


def _moe_reference(moe: MoE, cfg: LanguageModelConfig, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token, straight from the DeepSeek-V3 description: choose with bias, weight with the raw score."""
    out = []
    for x in x_TD:
        scores = torch.sigmoid(moe.gate.weight @ x)
        choice = scores + moe.gate.e_score_correction_bias
        idx = torch.argsort(choice, descending=True)[: cfg.num_experts_per_tok]
        w = scores[idx]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        y = moe.shared_experts(x)
        for weight, e in zip(w, idx):
            gate, up = (moe.experts.gate_up_proj[e] @ x).chunk(2)
            y = y + weight * (moe.experts.down_proj[e] @ (F.silu(gate) * up))
        out.append(y)
    return torch.stack(out)


def test_noaux_tc_against_hand_reference():
    cfg = tiny_test_config(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                           routed_scaling_factor=2.5, num_experts_per_tok=3)
    model = build_language_model(cfg).eval()
    moe = model.model.layers[1].mlp
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.5)
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, cfg.n_routed_experts))
        x = torch.randn(1, 6, cfg.hidden_size)
        got, route = moe(x)
        ref = _moe_reference(moe, cfg, x[0])
    assert (got[0] - ref).abs().max().item() < 1e-5
    # the bias changed the choice for at least one token, but never the weights' source (unbiased scores)
    unbiased = torch.topk(route.scores_TE, cfg.num_experts_per_tok, dim=-1).indices.sort(-1).values
    assert not torch.equal(unbiased, route.expert_ids_TK.sort(-1).values)


def test_plain_mha_against_hand_reference():
    cfg = tiny_test_config(use_mla=False, kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0)
    attn = MultiHeadAttention(cfg, 0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    B, T, D, H = 1, 5, cfg.hidden_size, cfg.num_attention_heads
    E = D // H
    x = torch.randn(B, T, D)
    pos = torch.arange(T)[None]
    with torch.no_grad():
        got = attn(x, *attention_inputs(pos, pos, torch.ones(B, T, dtype=torch.bool), None, E, cfg.rope_theta))
        q, k, v = (p(x)[0].view(T, H, E) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, E, 2).float() / E))
        ang = torch.arange(T).float()[:, None] * inv  # (T, E/2)
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

        def rot(t):  # Llama rotate_half
            return torch.cat((-t[..., E // 2:], t[..., : E // 2]), -1)

        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        outs = []
        for t in range(T):
            s = torch.einsum("he,she->hs", q[t], k[: t + 1]) / math.sqrt(E)
            outs.append(torch.einsum("hs,she->he", s.softmax(-1), v[: t + 1]).reshape(D))
        ref = attn.o_proj(torch.stack(outs))
    assert (got[0] - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("use_mla", [True, False])
def test_cached_decode_matches_full_forward_with_left_padding(use_mla):
    extra = {} if use_mla else dict(use_mla=False, kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0)
    model = build_language_model(tiny_test_config(q_lora_rank=16 if use_mla else None, **extra)).eval()
    torch.manual_seed(0)
    a, b = torch.randint(2, 256, (12,)), torch.randint(2, 256, (8,))
    with torch.no_grad():
        ref_a, ref_b = model(a[None]).logits[0], model(b[None]).logits[0]
        # batch of two prompts, left padded; prefill 6 slots, then one token at a time, then a chunk
        ids = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])
        mask = ids.new_ones(ids.shape, dtype=torch.bool)
        mask[1, :4] = False
        cache = model.new_cache(2, 16)
        parts = [model(ids[:, :6], attention_mask=mask[:, :6], cache=cache).logits]
        for t in range(6, 9):
            parts.append(model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache).logits)
        parts.append(model(ids[:, 9:], attention_mask=mask[:, 9:], cache=cache).logits)
        got = torch.cat(parts, 1)
        full = model(ids, attention_mask=mask).logits
    assert (got[0] - ref_a).abs().max() < 1e-4
    assert (got[1, 4:] - ref_b).abs().max() < 1e-4
    assert (full[1, 4:] - ref_b).abs().max() < 1e-4
    if use_mla:
        cfg = model.config
        assert cache.nbytes() == 2 * 16 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


@pytest.mark.parametrize("T", [40, 2])  # 2 tokens x 3 slots <= 8 experts: the gathered path of decoding
def test_grouped_dispatch_matches_loop_forward_and_backward(T):
    cfg = tiny_test_config(n_routed_experts=8, num_experts_per_tok=3)
    experts = build_language_model(cfg).model.layers[1].mlp.experts
    x = torch.randn(T, cfg.hidden_size, requires_grad=True)
    ids = torch.stack([torch.randperm(8)[:3] for _ in range(T)])
    ids[:, 0] = 0  # skewed: expert 0 always, expert 7 maybe never
    ids[ids == 7] = 6 if (ids == 6).sum() == 0 else 5
    w = torch.rand(T, 3, requires_grad=True)
    g = torch.randn(T, cfg.hidden_size)
    grads = []
    for path in ("grouped", "loop", "reference"):
        experts.zero_grad()
        x.grad = w.grad = None
        experts.use_grouped_mm = path == "grouped"
        y = experts.forward_reference(x, ids, w) if path == "reference" else experts(x, ids, w)
        (y * g).sum().backward()
        grads.append((y.detach(), x.grad.clone(), w.grad.clone(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_grouped_experts_compute_in_the_autocast_dtype():
    """Under autocast (bf16 on GPU) the routed experts cast their input and stacked weights as autocast casts
    nn.Linear: the output is in autocast's dtype, close to the fp32 loop, and gradients reach the fp32 parameters."""
    cfg = tiny_test_config(n_routed_experts=8, num_experts_per_tok=2)
    experts = build_language_model(cfg).model.layers[1].mlp.experts
    torch.manual_seed(0)
    x = torch.randn(32, cfg.hidden_size)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(32)])
    w = torch.rand(32, 2)
    want = experts.forward_reference(x, ids, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = experts(x, ids, w)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
    got.float().sum().backward()
    assert experts.gate_up_proj.grad.dtype == torch.float32 and experts.gate_up_proj.grad.abs().sum() > 0
    assert experts(x, ids, w).dtype == torch.float32  # no autocast: fp32 as before


def test_bias_update_moves_load_toward_balance():
    cfg = tiny_test_config(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, n_routed_experts=8,
                           num_experts_per_tok=2, bias_update_rate=0.01)
    torch.manual_seed(0)
    model = build_language_model(cfg).train()
    gate = model.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.weight.normal_(0, 0.1)
        gate.weight[:2] += 0.1  # with inputs shifted by +0.3, experts 0 and 1 win most tokens
    x = torch.randn(512, cfg.hidden_size) + 0.3

    def imbalance():
        ids = gate(x).expert_ids_TK
        gate.tokens_per_expert_E.zero_()
        load = torch.bincount(ids.flatten(), minlength=8).float()
        return (load.max() / load.mean()).item()

    before = imbalance()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.attach_bias_update(opt)  # the update runs as an optimizer step hook
    for _ in range(40):
        gate(x)
        opt.step()
    after = imbalance()
    assert before > 2.5 and after < 1.3, (before, after)
    assert gate.e_score_correction_bias[:2].max() < 0 < gate.e_score_correction_bias[2:].min()


def test_aux_loss_documented_value():
    # B=1, T=2, K=1, E=2, both tokens routed to expert 0; mean scores P = [0.8, 0.2].
    scores = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    route = RouterOutput(torch.tensor([[0], [0]]), torch.ones(2, 1), scores)
    # seq_aux: load = counts / (T*K/E) = [2, 0]; loss = alpha * (2 * 0.8 + 0 * 0.2) = 1.6 alpha
    assert balance_aux_loss(route, 1, alpha=0.1).item() == pytest.approx(0.16)
    # token-level form: f = E * counts / (T*K) = [2, 0]; same value for one sequence
    assert balance_aux_loss(route, 1, alpha=0.1, seq_aux=False).item() == pytest.approx(0.16)
    balanced = RouterOutput(torch.tensor([[0], [1]]), torch.ones(2, 1), scores)
    assert balance_aux_loss(balanced, 1, alpha=0.1).item() == pytest.approx(0.1)  # load [1, 1]: 0.8 + 0.2
    # padding tokens are left out when a mask is given: only token 0 counts -> load [2, 0], P = [0.9, 0.1]
    assert balance_aux_loss(route, 1, alpha=0.1, token_mask_T=torch.tensor([True, False])).item() == pytest.approx(0.18)


def test_training_step_returns_aux_loss_and_router_choices():
    model = build_language_model(tiny_test_config()).train()
    ids = torch.randint(0, 256, (2, 9))
    out = model(ids, return_router=True)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    moe_routes = [r for r in out.router if r is not None]
    assert len(moe_routes) == model.config.num_hidden_layers - model.config.first_k_dense_replace
    assert moe_routes[0].expert_ids_TK.shape == (18, model.config.num_experts_per_tok)
    (F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss).backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


# Published totals: Tiny 3.37B / Small 16.1B / Base 27.5B for the whole model, of which SigLIP ~0.43B; activated
# 1.0B / 2.8B / 4.5B. Activated counts matmul weights (the input embedding is a lookup).
@pytest.mark.parametrize("preset,total_b,active_b", [("tiny", 2.93, 0.57), ("small", 15.7, 2.4), ("base", 27.1, 4.07)])
def test_preset_parameter_counts_on_meta(preset, total_b, active_b):
    model = build_language_model(language_preset(preset), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    total, active = model.num_parameters() / 1e9, model.num_active_parameters(exclude_embeddings=True) / 1e9
    print(f"{preset}: LM total {total:.2f}B, activated {active:.2f}B")
    assert total == pytest.approx(total_b, rel=0.03)
    assert active == pytest.approx(active_b, rel=0.12)


@pytest.mark.parametrize("use_mla", [True, False])
def test_bidirectional_block_sees_itself_but_prefix_stays_causal(use_mla):
    extra = {} if use_mla else dict(use_mla=False, kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0)
    model = build_language_model(tiny_test_config(**extra)).eval()
    ids = torch.randint(2, 256, (1, 10))
    block = torch.full((1, 10), -1)
    block[0, 6:] = 0  # the last four tokens form one bidirectional block
    with torch.no_grad():
        causal = model(ids).logits
        mixed = model(ids, block_ids=block).logits
        changed = ids.clone()
        changed[0, 9] = (ids[0, 9] + 1) % 256
        mixed_changed = model(changed, block_ids=block).logits
    assert torch.allclose(mixed[:, :6], causal[:, :6], atol=1e-6)  # the prefix never sees the block
    assert not torch.allclose(mixed[:, 6:9], causal[:, 6:9], atol=1e-4)  # block tokens see later block tokens
    assert not torch.allclose(mixed_changed[:, 6], mixed[:, 6], atol=1e-6)  # token 6 depends on token 9
    assert torch.allclose(mixed_changed[:, :6], mixed[:, :6], atol=1e-6)
