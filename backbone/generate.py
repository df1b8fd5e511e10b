"""Autoregressive generation with the latent KV cache: greedy, or temperature + top-p sampling; stop tokens; a batch of
left-padded prompts; optional chunked ("incremental") prefill of long prompts."""

from __future__ import annotations

import torch


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy when temperature <= 0; else sample from the top-p nucleus of softmax(logits / temperature)."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_ids = probs_BV.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
        return sorted_ids.gather(-1, choice)[:, 0]
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


def compile_decoder(model):
    """`model` compiled for `generate`'s decode passes (one new token per sequence against the KV cache; pass it as
    `decode_model`). A small model's decode pass is hundreds of small ops whose dispatch, not arithmetic, sets its
    time (the demo-size model, one thread: 2.9 ms eager, 0.65 ms compiled, docs/experiments/decode_pass.py); compiled,
    they run as a few fused kernels. Shapes are dynamic (the cache grows each pass; any batch size), but the first
    call at batch 1 and the first at a larger batch each compile (tens of seconds on a CPU). Parameters (and forward
    hooks) are `model`'s."""
    return torch.compile(model, dynamic=True)


@torch.no_grad()
def prefill(model, cache, input_ids=None, inputs_embeds=None, attention_mask=None, chunk_size: int = 0,
            router_bias: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Run the prompt through the model into `cache`; returns the last position's logits (B, V).

    chunk_size > 0 prefills in chunks (DeepSeek-VL2's incremental prefilling for long multi-image prompts); the result
    equals a one-shot prefill. `router_bias` ({MoE layer: (B, T, E)}, as the model's forward takes it) is sliced with
    the chunks.
    """
    x = input_ids if inputs_embeds is None else inputs_embeds
    T = x.shape[1]
    mask = attention_mask if attention_mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    step = chunk_size if chunk_size > 0 else T
    logits = None
    for start in range(0, T, step):
        end = min(start + step, T)
        kwargs = {"input_ids": x[:, start:end]} if inputs_embeds is None else {"inputs_embeds": x[:, start:end]}
        if router_bias:
            kwargs["router_bias"] = {layer: b[:, start:end] for layer, b in router_bias.items()}
        logits = model(**kwargs, attention_mask=mask[:, start:end], cache=cache, logits_to_keep=1).logits[:, -1]
    return logits


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_token_ids: list[int] | tuple[int, ...] = (),
    pad_token_id: int = 0,
    prefill_chunk_size: int = 0,
    generator: torch.Generator | None = None,
    allowed_token_ids: torch.Tensor | None = None,
    router_bias: dict[int, torch.Tensor] | None = None,
    decode_router_bias: dict[int, torch.Tensor] | None = None,
    decode_model=None,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` per prompt. Prompts are left-padded (attention_mask marks real tokens).

    Returns the new tokens (B, N); after a sequence emits a stop token, its remaining positions hold `pad_token_id`.
    `allowed_token_ids` constrains decoding to a vocabulary subset (e.g. action tokens).
    Router-logit biases, so that cached decoding routes as a full forward with the same `router_bias` would:
    `router_bias` {MoE layer: (B, T, E)} for the prompt; `decode_router_bias` {MoE layer: (B, E)} for every generated
    token (e.g. the VLA policy's per-embodiment prior on action tokens). `decode_model` runs the one-token passes
    (default `model`; e.g. `compile_decoder(model)`), the prompt's prefill stays with `model`.
    """
    x = input_ids if inputs_embeds is None else inputs_embeds
    B, T = x.shape[:2]
    model_max = model.config.max_position_embeddings
    if T + max_new_tokens > model_max:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new exceeds the context of {model_max}")
    cache = model.new_cache(B, T + max_new_tokens)
    logits_BV = prefill(model, cache, input_ids, inputs_embeds, attention_mask, prefill_chunk_size, router_bias)
    step_bias = {layer: b[:, None] for layer, b in decode_router_bias.items()} if decode_router_bias else None
    stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=x.device)
    done_B = torch.zeros(B, dtype=torch.bool, device=x.device)
    step = model if decode_model is None else decode_model
    out = []
    for _ in range(max_new_tokens):
        if allowed_token_ids is not None:
            masked = torch.full_like(logits_BV, float("-inf"))
            masked[:, allowed_token_ids] = logits_BV[:, allowed_token_ids]
            logits_BV = masked
        next_B = sample_next(logits_BV, temperature, top_p, generator)
        next_B = torch.where(done_B, torch.full_like(next_B, pad_token_id), next_B)
        out.append(next_B)
        if stop.numel():
            done_B |= torch.isin(next_B, stop)
        if len(out) == max_new_tokens or bool(done_B.all()):
            break  # no forward pass for logits nobody reads
        logits_BV = step(next_B[:, None], cache=cache, logits_to_keep=1, router_bias=step_bias).logits[:, -1]
    return torch.stack(out, 1)
