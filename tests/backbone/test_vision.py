"""Vision side: SigLIP tower geometry, adaptor unfold order, token layout, the encoder end to end with the processor."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from backbone.processor import DeepseekVL2Processor, ProcessorConfig, image_token_count, tokens_for_grid
from backbone.tokenizer import build_bpe_tokenizer
from backbone.vision import Projector, ProjectorConfig, VisionConfig, VisionEncoder, layout_image_tokens


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return VisionEncoder(VisionConfig.preset("tiny"), ProjectorConfig(input_dim=32, n_embed=48)).eval()


# ---------------------------------------------------------------------------------------------------- configs
def test_so400m_numbers_and_positions():
    cfg = VisionConfig.preset("so400m")
    assert (cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.patch_size, cfg.image_size) == (1152, 27, 16, 4304, 14, 384)  # fmt: skip
    assert cfg.grid_side == 27 and cfg.num_positions == 729
    siglip = cfg.to_siglip()
    assert siglip.vision_use_head is False and siglip.hidden_act == "gelu_pytorch_tanh" and siglip.layer_norm_eps == 1e-6
    # build only the embeddings of the full-size tower (cheap): 729 positions, conv without padding
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

    emb = SiglipVisionEmbeddings(siglip)
    assert emb.position_embedding.weight.shape == (729, 1152)
    with torch.no_grad():
        assert emb(torch.zeros(1, 3, 384, 384)).shape == (1, 729, 1152)


def test_official_config_round_trip():
    published = {"layers": 27, "mlp_ratio": 3.7362, "model_name": "siglip_so400m_patch14_384", "model_type": "vision",
                 "patch_size": 14, "width": 1152}  # fmt: skip
    cfg = VisionConfig.from_official(published)
    assert cfg == VisionConfig()
    assert VisionConfig.from_official(cfg.to_official()) == cfg
    tiny = VisionConfig.preset("tiny", mlp_dim=77)
    assert VisionConfig.from_official(tiny.to_official()) == tiny
    proj = ProjectorConfig.from_official({"model_type": "mlp_projector", "n_embed": 1280})
    assert (proj.input_dim, proj.n_embed, proj.depth, proj.downsample_ratio) == (1152, 1280, 2, 2)
    assert ProjectorConfig.from_official(proj.to_official()) == proj
    with pytest.raises(ValueError):
        ProjectorConfig(projector_type="linear")


# ---------------------------------------------------------------------------------------------------- adaptor
def test_projector_parameter_names():
    proj = Projector(ProjectorConfig(input_dim=8, n_embed=6))
    names = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    assert names == {"layers.0.weight": (6, 32), "layers.0.bias": (6,), "layers.2.weight": (6, 6), "layers.2.bias": (6,)}
    assert isinstance(proj.layers[1], torch.nn.GELU) and proj.layers[1].approximate == "none"


def test_unfold_order_on_coded_feature_map():
    """Odd grid (3x3 -> padded 4x4): token (i, j), channel c carries code 1000*c + 10*i + j (+1 so zero = padding)."""
    side, channels = 3, 2
    codes = torch.zeros(1, side, side, channels)
    for i in range(side):
        for j in range(side):
            for c in range(channels):
                codes[0, i, j, c] = 1000 * c + 10 * i + j + 1
    merged = Projector(ProjectorConfig(input_dim=channels, n_embed=4)).merge(codes.reshape(1, side * side, channels))
    assert merged.shape == (1, 4, channels * 4)  # ceil(3/2)^2 tokens of 4C
    for oi in range(2):
        for oj in range(2):
            token = merged[0, oi * 2 + oj]
            for c in range(channels):
                for ki in range(2):
                    for kj in range(2):
                        i, j = 2 * oi + ki, 2 * oj + kj
                        expected = 0.0 if i >= side or j >= side else 1000 * c + 10 * i + j + 1
                        assert token[c * 4 + ki * 2 + kj].item() == expected, (oi, oj, c, ki, kj)


def test_projector_27_grid_to_196():
    proj = Projector(ProjectorConfig(input_dim=4, n_embed=5))
    x = torch.randn(2, 729, 4)
    assert proj(x).shape == (2, 196, 5)
    # the padding row/column is zero: the last merged token of each row only sees column 26 in its left half
    merged = proj.merge(x)
    assert torch.all(merged[:, 13].reshape(2, 4, 4)[:, :, [1, 3]] == 0)


def test_projector_mlp_matches_manual():
    torch.manual_seed(0)
    proj = Projector(ProjectorConfig(input_dim=3, n_embed=4))
    x = torch.randn(1, 16, 3)
    merged = proj.merge(x)
    l0, l2 = proj.layers[0], proj.layers[2]
    manual = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(merged, l0.weight, l0.bias)), l2.weight, l2.bias
    )
    assert torch.allclose(proj(x), manual)


# ---------------------------------------------------------------------------------------------------- layout
def test_layout_positions_on_coded_features():
    h, dim, nw, nh = 2, 3, 3, 2
    # tile t, row i, col j -> value 100*t + 10*i + j in every channel; newline = -1, separator = -2
    tiles = torch.stack(
        [torch.tensor([[100.0 * t + 10 * i + j] * dim for i in range(h) for j in range(h)]) for t in range(1 + nw * nh)]
    )
    out = layout_image_tokens(tiles, torch.full((dim,), -1.0), torch.full((dim,), -2.0), nw, nh)
    assert out.shape == (tokens_for_grid(nw, nh, ProcessorConfig(tile_size=28, patch_size=7)), dim)  # h = 2
    values = out[:, 0].tolist()
    expected = [0, 1, -1, 10, 11, -1, -2]  # global grid with newlines, then the separator
    for row in range(nh * h):  # local: rows run across the tiles horizontally
        th, i = divmod(row, h)
        for col in range(nw * h):
            tw, j = divmod(col, h)
            expected.append(100 * (1 + th * nw + tw) + 10 * i + j)
        expected.append(-1)
    assert values == expected
    assert torch.all(out == out[:, :1])  # every channel moved together

    tail = layout_image_tokens(tiles, torch.full((dim,), -1.0), torch.full((dim,), -2.0), nw, nh, "tail")[:, 0].tolist()
    assert tail == expected[7:] + [-2] + expected[:6]


def test_layout_rejects_wrong_tile_count():
    with pytest.raises(ValueError, match="1 \\+ nw\\*nh"):
        layout_image_tokens(torch.zeros(3, 4, 2), torch.zeros(2), torch.zeros(2), 2, 2)


# ---------------------------------------------------------------------------------------------------- encoder
def test_encoder_parameter_names(encoder):
    keys = set(encoder.state_dict())
    assert {"image_newline", "view_seperator", "projector.layers.0.weight", "projector.layers.2.bias",
            "vision.vision_model.embeddings.patch_embedding.weight",
            "vision.vision_model.embeddings.position_embedding.weight",
            "vision.vision_model.encoder.layers.1.self_attn.q_proj.weight",
            "vision.vision_model.post_layernorm.weight"} <= keys  # fmt: skip
    assert not any(".head." in k for k in keys)  # no pooling head


def test_tiny_tower_runs(encoder):
    with torch.no_grad():
        out = encoder.vision(pixel_values=torch.randn(3, 3, 64, 64)).last_hidden_state
    assert out.shape == (3, 64, 32) and torch.isfinite(out).all()
    # last hidden state is after post_layernorm: zero mean, unit variance per token before the affine (identity here)
    assert torch.allclose(out.mean(-1), torch.zeros(3, 64), atol=1e-5)
    assert encoder.tokens_per_tile == 16


def test_encoder_token_counts_match_processor(encoder):
    proc = DeepseekVL2Processor(build_bpe_tokenizer(), ProcessorConfig.preset("tiny"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(150, 90), (40, 200)]]
    sample = proc.process("<image> and <image>", images)
    with torch.no_grad():
        feats = encoder(sample["images"], sample["images_spatial_crop"])
    assert feats.shape == (int(sample["images_seq_mask"].sum()), 48)
    assert feats.shape[0] == sum(image_token_count(im.width, im.height, 2, proc.config) for im in images)
    # the newline vector sits at the end of each global row
    assert torch.equal(feats[4], encoder.image_newline.detach()) and torch.equal(feats[20], encoder.view_seperator.detach())


def test_encoder_matches_manual_pipeline(encoder):
    torch.manual_seed(1)
    tiles = torch.randn(1 + 2 * 1, 3, 64, 64)
    crop = torch.tensor([[2, 1]])
    with torch.no_grad():
        got = encoder(tiles, crop)
        hidden = encoder.vision(pixel_values=tiles).last_hidden_state
        manual = layout_image_tokens(encoder.projector(hidden), encoder.image_newline, encoder.view_seperator, 2, 1)
    assert torch.allclose(got, manual, atol=1e-6)


def test_merge_into_batch(encoder):
    proc = DeepseekVL2Processor(build_bpe_tokenizer(), ProcessorConfig.preset("tiny"))
    rng = np.random.default_rng(2)
    img = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    samples = [proc.process("<image> hi", [img(100, 64)]), proc.process("text only"), proc.process("<image><image>", [img(64, 64), img(64, 120)])]  # fmt: skip
    batch = proc.collate(samples)
    B, T = batch["input_ids"].shape
    text = torch.randn(B, T, 48)
    with torch.no_grad():
        merged = encoder.merge_into(text, batch["images_seq_mask"], batch["images"], batch["images_spatial_crop"])
        per_sample = encoder.embed_batch(batch["images"], batch["images_spatial_crop"])
        alone = encoder(samples[2]["images"], samples[2]["images_spatial_crop"])
    mask = batch["images_seq_mask"]
    assert torch.equal(merged[~mask], text[~mask])
    assert per_sample[1].shape == (0, 48)
    assert torch.allclose(merged[2][mask[2]], alone, atol=1e-5)
    assert torch.allclose(merged[0][mask[0]], per_sample[0])
    # text-only batch: tower skipped, input returned as is
    text_only = proc.collate([proc.process("a"), proc.process("bc")])
    same = encoder.merge_into(text[:2], text_only["images_seq_mask"], text_only["images"], text_only["images_spatial_crop"])
    assert same is text[:2] or torch.equal(same, text[:2])
    with pytest.raises(ValueError, match="image positions"):
        encoder.merge_into(text, torch.zeros_like(mask), batch["images"], batch["images_spatial_crop"])


def test_encoder_grads_and_bf16(encoder):
    enc = VisionEncoder(VisionConfig.preset("tiny"), ProjectorConfig(input_dim=32, n_embed=16))
    out = enc(torch.randn(2, 3, 64, 64), torch.tensor([[1, 1]]))
    out.sum().backward()
    assert enc.image_newline.grad is not None and enc.vision.vision_model.embeddings.patch_embedding.weight.grad is not None
    with torch.no_grad():
        half = enc.to(torch.bfloat16)(torch.randn(2, 3, 64, 64), torch.tensor([[1, 1]]))
    assert half.dtype == torch.bfloat16 and half.shape == (tokens_for_grid(1, 1, ProcessorConfig.preset("tiny")), 16)
    assert math.isfinite(half.float().sum().item())


def test_centred_image_tokens_have_zero_mean_per_tile_and_are_off_for_official_models():
    import torch

    from backbone.deepseek_vl2 import deepseek_vl2_preset
    from backbone.vision import ProjectorConfig, VisionConfig, VisionEncoder

    assert deepseek_vl2_preset("base").center_image_tokens is False
    vision = VisionConfig.preset("tiny")
    plain = VisionEncoder(vision, ProjectorConfig(input_dim=vision.width, n_embed=48))
    centred = VisionEncoder(vision, ProjectorConfig(input_dim=vision.width, n_embed=48), center_tokens=True)
    centred.load_state_dict(plain.state_dict())
    tiles = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a, b = plain.encode_tiles(tiles), centred.encode_tiles(tiles)
    assert torch.allclose(b.mean(1), torch.zeros(3, 48), atol=1e-5)
    assert torch.allclose(a - a.mean(1, keepdim=True), b, atol=1e-5)
