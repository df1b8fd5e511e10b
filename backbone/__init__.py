"""backbone: DeepSeek-VL2 (SigLIP tiling vision + adaptor + DeepSeekMoE/MLA language model). Knows nothing of robots."""
