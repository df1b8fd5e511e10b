"""`vla bench memory` sizes the tiny preset on the meta device: the JSON keys, the arithmetic between the columns,
and the LoRA target (trainable parameters <= 2% of the total; the adapter is that share of the full checkpoint)."""

from omegaconf import OmegaConf


def test_bench_memory_tiny_on_meta(capsys):
    from benchmarks.memory import run

    out = run(OmegaConf.create({"presets": ["tiny"], "quick": False, "threads": 0, "seed": 0}))
    tiny = out["tiny"]
    assert set(tiny) == {"inference_gb", "full_ft_gb_1gpu", "full_ft_gb_8gpu", "lora_gb_1gpu", "lora_trainable_fraction",
                         "lora_experts_gb_1gpu", "lora_experts_trainable_fraction"}
    assert 6.0 < tiny["inference_gb"] < 6.6  # 3.37B parameters in bf16
    assert abs(tiny["full_ft_gb_1gpu"] - 8 * tiny["inference_gb"]) < 0.05  # 16 B / param
    assert tiny["full_ft_gb_1gpu"] / 8 < tiny["full_ft_gb_8gpu"] < tiny["full_ft_gb_1gpu"] / 4
    assert tiny["inference_gb"] < tiny["lora_gb_1gpu"] < tiny["full_ft_gb_8gpu"]
    assert 0 < tiny["lora_trainable_fraction"] <= 0.02
    # the routed experts' adapters, and their W + BA held for the backward pass: more, still far below full FT
    assert tiny["lora_trainable_fraction"] < tiny["lora_experts_trainable_fraction"] <= 0.05
    assert tiny["lora_gb_1gpu"] < tiny["lora_experts_gb_1gpu"] < tiny["full_ft_gb_8gpu"] + tiny["inference_gb"]
    assert "LoRA r=16 1 GPU" in capsys.readouterr().out
