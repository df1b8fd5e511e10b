"""Loading what DeepSeek publishes: the released `config.json` of DeepSeek-VL2 Tiny / Small / Base parse to our
presets field for field, and a checkpoint in the released layout (bf16 safetensors in several shards with
`model.safetensors.index.json`) loads back exactly, with `dtype=`, and fails clearly when a shard or an index entry is
wrong.

The fixtures in tests/fixtures/official_configs/ are the published files as far as they are known; which keys were
seen verbatim and which are reconstructed is written in that folder's README.md and in docs/official_checkpoints.md.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from backbone.checkpoint import INDEX_NAME, CheckpointError, write_checkpoint
from backbone.convert import deepseek_vl2_to_official
from backbone.deepseek_vl2 import (DeepseekVL2Config, build_deepseek_vl2, deepseek_vl2_preset, load_deepseek_vl2)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "official_configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def _fields(obj, prefix=""):
    """Every leaf field of a (nested) dataclass as {dotted name: value}."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_fields(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_published_config_json_parses_to_the_preset_field_for_field(name):
    raw = json.loads((FIXTURES / name / "config.json").read_text())
    assert raw["model_type"] == "deepseek_vl_v2" and raw["torch_dtype"] == "bfloat16"
    parsed, preset = _fields(DeepseekVL2Config.from_official(raw)), _fields(deepseek_vl2_preset(name))
    assert parsed.keys() == preset.keys()
    differ = {k: (parsed[k], preset[k]) for k in parsed if parsed[k] != preset[k] or type(parsed[k]) is not type(preset[k])}
    assert not differ, f"{name}: config.json -> (parsed, preset) differ: {differ}"
    # what we write back lists the same 23 tile shapes, in the published (tie-breaking) order
    assert deepseek_vl2_preset(name).to_official()["candidate_resolutions"] == raw["candidate_resolutions"]


def _bf16_sharded_checkpoint(path: Path):
    """A tiny VL2 (noaux_tc routing, so the correction bias is in the file) written as DeepSeek publishes: bf16,
    several shards, an index; plus the unused `vision.attn_pool.*` tensors real files carry. Returns (model, state)."""
    torch.manual_seed(0)
    config = deepseek_vl2_preset("test", topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                                 routed_scaling_factor=2.0)
    model = build_deepseek_vl2(config).eval()
    with torch.no_grad():
        for layer in model.language.model.layers:
            if layer.is_moe:
                layer.mlp.gate.e_score_correction_bias.normal_()
    official = {k: v.to(torch.bfloat16) for k, v in deepseek_vl2_to_official(model.state_dict()).items()}
    width = config.vision.width
    official["vision.attn_pool.latent"] = torch.randn(1, 1, width).to(torch.bfloat16)
    official["vision.attn_pool.q.weight"] = torch.randn(width, width).to(torch.bfloat16)
    write_checkpoint(path, config.to_official() | {"torch_dtype": "bfloat16"}, official, max_shard_bytes=60_000)
    return model, official


def test_bf16_sharded_checkpoint_loads_exactly_with_dtype(tmp_path):
    model, official = _bf16_sharded_checkpoint(tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(official) and not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in official.values())
    assert all(t.dtype == torch.bfloat16 for shard in shards for t in load_file(str(tmp_path / shard)).values())

    original = model.state_dict()
    for dtype in (torch.bfloat16, torch.float32, None):
        loaded = load_deepseek_vl2(tmp_path, dtype=dtype)
        state = loaded.state_dict()
        assert state.keys() == original.keys()
        for key, want in original.items():
            got = state[key]
            if key.endswith("e_score_correction_bias"):  # routing state: always float32, as the module declares it
                assert got.dtype == torch.float32, key
            else:
                assert got.dtype == (dtype or torch.bfloat16), (key, got.dtype)
            # bf16 rounding of the original is the only change; an fp32 load upcasts it exactly
            assert torch.equal(got.float(), want.to(torch.bfloat16).float()), key
    # the bf16 model runs (text only: CPU bf16 convolutions are not needed for this check)
    ids = torch.randint(2, loaded.config.language.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.isfinite(load_deepseek_vl2(tmp_path, dtype=torch.bfloat16)(input_ids=ids).logits).all()


def test_sharded_checkpoint_errors_name_the_shard_and_the_tensor(tmp_path):
    _bf16_sharded_checkpoint(tmp_path / "ok")
    index = json.loads((tmp_path / "ok" / INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))

    def variant(name):
        d = tmp_path / name
        d.mkdir()
        for f in (tmp_path / "ok").iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d

    # a shard the index names is not there
    d = variant("missing_shard")
    (d / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[1]}: shard listed in {INDEX_NAME} is missing"):
        load_deepseek_vl2(d)

    # the index lists a tensor its shard does not hold
    d = variant("missing_tensor")
    victim = "language.model.norm.weight"
    shard = weight_map[victim]
    tensors = load_file(str(d / shard))
    del tensors[victim]
    save_file(tensors, str(d / shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{INDEX_NAME} lists tensors absent from {shard}: \['{victim}'\]"):
        load_deepseek_vl2(d)

    # a shard holds a tensor the index has no entry for (an index that does not describe the files)
    d = variant("missing_entry")
    victim = "language.model.layers.1.mlp.experts.3.up_proj.weight"
    broken = dict(index, weight_map={k: v for k, v in weight_map.items() if k != victim})
    (d / INDEX_NAME).write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match=rf"{weight_map[victim]} holds tensors with no entry in {INDEX_NAME}: "
                                              rf"\['{victim}'\]"):
        load_deepseek_vl2(d)

    # an index entry pointing at the wrong shard
    d = variant("wrong_shard")
    victim = "language.lm_head.weight"
    other = next(s for s in shards if s != weight_map[victim])
    (d / INDEX_NAME).write_text(json.dumps(dict(index, weight_map=weight_map | {victim: other})))
    with pytest.raises(CheckpointError, match=rf"{weight_map[victim]} holds tensors that {INDEX_NAME} places in another "
                                              rf"shard: {victim} \(listed in {other}\)"):
        load_deepseek_vl2(d)

    # an index that is not JSON
    d = variant("bad_index")
    (d / INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable shard index"):
        load_deepseek_vl2(d)
