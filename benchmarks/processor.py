"""`vla bench processor`: decoded PIL image -> model inputs, for 384x384, 1024x768 and 3000x400 images.

Two paths per size, with the published geometry (384 tiles, patch 14, up to 9 tiles):
  image: `preprocess_image` only (resize/pad, tiling, normalization);
  full:  `process` of a one-image prompt in inference mode (the above + chat template, tokenization, labels, masks).
The tokenizer is the built byte-level BPE (no downloads); the official one differs only in the ids it returns.
The processor must not be the bottleneck of a control loop: a 384x384 frame under 10 ms (`meets_10ms_384`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from backbone.processor import DeepseekVL2Processor, ProcessorConfig
from backbone.tokenizer import build_bpe_tokenizer
from benchmarks._util import print_table, time_call

SIZES = {"384": (384, 384), "1024x768": (1024, 768), "3000x400": (3000, 400)}
BUDGET_MS_384 = 10.0


def _photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A smooth gradient with noise: decodes like a photo, not a constant image PIL could shortcut."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noisy = base + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def run(cfg) -> dict:
    if int(cfg.get("threads", 0) or 0) > 0:
        torch.set_num_threads(int(cfg.threads))
    quick = bool(cfg.get("quick", False))
    repeats = 5 if quick else 30
    processor = DeepseekVL2Processor(build_bpe_tokenizer(), ProcessorConfig())
    prompt = "<image>\nWhat should the robot do next?"

    result: dict[str, object] = {"repeats": repeats}
    rows = []
    for name, (width, height) in SIZES.items():
        image = _photo_like(width, height, seed=int(cfg.get("seed", 0) or 0))
        sample = processor.process(prompt, [image], inference=True)
        image_s = time_call(lambda: processor.preprocess_image(image), repeats, warmup=2)
        full_s = time_call(lambda: processor.process(prompt, [image], inference=True), repeats, warmup=2)
        nw, nh = sample["images_spatial_crop"][0].tolist()
        rows.append([f"{width}x{height}", f"{nw}x{nh}", sample["images"].shape[0], sample["num_image_tokens"][0],
                     image_s * 1e3, full_s * 1e3, 1 / full_s])  # fmt: skip
        result[f"ms_{name}"] = round(full_s * 1e3, 3)
        result[f"ms_image_{name}"] = round(image_s * 1e3, 3)
        result[f"ips_{name}"] = round(1 / full_s, 1)
        result[f"tiles_{name}"] = int(sample["images"].shape[0])
        result[f"image_tokens_{name}"] = int(sample["num_image_tokens"][0])
    print_table(["image", "grid", "tiles", "img tokens", "image ms", "full ms", "images/s"], rows)
    result["meets_10ms_384"] = bool(result["ms_384"] < BUDGET_MS_384)
    print(f"384x384 frame: {result['ms_384']:.2f} ms (budget {BUDGET_MS_384:.0f} ms)")
    return result
