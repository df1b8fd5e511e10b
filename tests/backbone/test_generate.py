"""Generation: greedy matches step-by-step argmax of full forwards, batches with left padding match single prompts,
stop tokens, nucleus sampling, chunked prefill, compiled decode passes."""

import torch

from backbone.config import tiny_test_config
from backbone.generate import compile_decoder, generate, prefill, sample_next
from backbone.language_model import build_language_model


def _model():
    torch.manual_seed(0)
    model = build_language_model(tiny_test_config()).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # sharper logits so greedy paths are not decided by rounding
    return model


def test_greedy_matches_full_forward_argmax():
    model = _model()
    ids = torch.randint(2, 256, (1, 7))
    got = generate(model, ids, max_new_tokens=6)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(got, seq[:, 7:])


def test_n_new_tokens_take_n_forward_passes():
    """The prefill gives the first token, each further token one cached pass; none after the last (or a stop)."""
    model = _model()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    generate(model, torch.randint(2, 256, (1, 7)), max_new_tokens=6)
    assert len(calls) == 6
    calls.clear()
    first = generate(model, torch.randint(2, 256, (1, 7)), max_new_tokens=1)
    assert len(calls) == 1 and first.shape == (1, 1)


def test_batch_with_left_padding_matches_single_prompts():
    model = _model()
    a, b = torch.randint(2, 256, (9,)), torch.randint(2, 256, (4,))
    ids = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :5] = False
    batch = generate(model, ids, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(batch[0], generate(model, a[None], max_new_tokens=5)[0])
    assert torch.equal(batch[1], generate(model, b[None], max_new_tokens=5)[0])


def test_compiled_decode_passes_give_the_eager_tokens(one_thread):
    """compile_decoder: the one-token passes run compiled (the prefill eager), on a left-padded batch: the same
    tokens, through the eager model's parameters (no copy) and its forward hooks."""
    model = _model()
    a, b = torch.randint(2, 256, (9,)), torch.randint(2, 256, (4,))
    ids = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :5] = False
    decoder = compile_decoder(model)
    assert {n for n, _ in decoder.named_parameters()} == {f"_orig_mod.{n}" for n, _ in model.named_parameters()}
    assert all(p is q for p, q in zip(decoder.parameters(), model.parameters()))
    passes = []

    def counted(*args, **kwargs):
        passes.append(1)
        return decoder(*args, **kwargs)

    assert torch.equal(generate(model, ids, attention_mask=mask, max_new_tokens=6, decode_model=counted),
                       generate(model, ids, attention_mask=mask, max_new_tokens=6))
    assert len(passes) == 5  # every pass after the prefill
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    generate(model, ids, attention_mask=mask, max_new_tokens=6, decode_model=decoder)
    assert len(calls) == 6  # the prefill, then each cached pass through the compiled module


def test_stop_tokens_pad_the_rest():
    model = _model()
    ids = torch.randint(2, 256, (2, 5))
    free = generate(model, ids, max_new_tokens=6)
    stop = int(free[0, 1])
    out = generate(model, ids, max_new_tokens=6, stop_token_ids=[stop], pad_token_id=255)
    assert out[0, 1] == stop and (out[0, 2:] == 255).all()


def test_sampling_nucleus_and_constraints():
    logits = torch.tensor([[0.0, 5.0, 4.0, -2.0]])
    g = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, 1.0, top_p=0.5, generator=g).item() == 1 for _ in range(20))
    picks = {sample_next(logits, 1.0, top_p=0.99, generator=g).item() for _ in range(200)}
    assert {1, 2} <= picks and 3 not in picks
    model = _model()
    allowed = torch.tensor([10, 11, 12])
    out = generate(model, torch.randint(2, 256, (2, 4)), max_new_tokens=4, temperature=1.0, allowed_token_ids=allowed,
                   generator=torch.Generator().manual_seed(1))
    assert torch.isin(out, allowed).all()


def test_chunked_prefill_equals_one_shot():
    model = _model()
    ids = torch.randint(2, 256, (2, 23))
    c1, c2 = model.new_cache(2, 30), model.new_cache(2, 30)
    one = prefill(model, c1, ids)
    chunked = prefill(model, c2, ids, chunk_size=5)
    assert torch.allclose(one, chunked, atol=1e-5)
    assert torch.allclose(c1.c_kv[1][:, :23], c2.c_kv[1][:, :23], atol=1e-5)


def test_router_bias_routes_cached_decoding_as_the_full_forward():
    """A prompt bias (sliced with the prefill chunks) and a per-sequence bias on every generated token: greedy decoding
    with the cache equals step-by-step argmax of full forwards given the same biases, with left padding."""
    model = _model()
    with torch.no_grad():  # louder experts, so that which experts a token gets shows in the chosen tokens
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.experts.down_proj.mul_(30)
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 256, (2, 9), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = False
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    prompt_bias = {i: torch.randn(2, 9, cfg.n_routed_experts, generator=g) * 3 for i in layers}
    step_bias = {i: torch.randn(2, cfg.n_routed_experts, generator=g) * 3 for i in layers}
    n = 5
    got = generate(model, ids, attention_mask=mask, max_new_tokens=n, prefill_chunk_size=4,
                   router_bias=prompt_bias, decode_router_bias=step_bias)
    prompt_only = generate(model, ids, attention_mask=mask, max_new_tokens=n, router_bias=prompt_bias)
    assert not torch.equal(got, prompt_only)  # the per-token bias matters here
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for t in range(n):
            bias = {i: torch.cat([prompt_bias[i], step_bias[i][:, None].expand(-1, t, -1)], 1) for i in layers}
            nxt = model(seq, attention_mask=seq_mask, router_bias=bias).logits[:, -1].argmax(-1, keepdim=True)
            seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt, dtype=torch.bool)], 1)
    assert torch.equal(got, seq[:, 9:])
