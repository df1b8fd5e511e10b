"""Does an object's image token say where the object is? A ridge-regression probe from the adaptor's output token
that holds an object's centre (the 4x4 global-view grid of a 64-px frame, what the language model reads) to the
object's x1 and y1 (0..999), fit on `--train` scenes and scored on `--test` others: the share within 40 units and R^2,
for x1 (the column) and y1 (the row); and the same probe to the object's colour and shape (one-hot targets, argmax):
the share read right. The token's index is not an input: only its content. `--tokens tower` probes
the SigLIP tower's patch token (8x8 grid) at the centre instead, before the adaptor; `--tokens code` the code stage
vision fits the adaptor's tokens to (`vla.train.vision_stage.cell_codes` from the renderer's labels, `--box-bins` and
`--code-pool` as the recipe's, centred as the checkpoint's encoder centres tokens): what a perfect adaptor would give.
`--normalize` scales each token to unit norm first, as the language model's first RMSNorm does.

    python docs/experiments/token_probe.py checkpoints/dsvl2-mini [--train 2000 --test 500] [--tokens tower|code]
        [--normalize] [--box-bins 10] [--code-pool share|object] [--camera top|wrist]

`--camera wrist` probes the arm's wrist frames instead (objects whose centre it shows).
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from PIL import Image


def code_tokens(encoder, records, box_bins: int, code_pool: str) -> torch.Tensor:
    """(N, L, D) the code stage vision fits the adaptor's tokens to, for `records` (centred as the encoder does)."""
    from vla.train.vision_stage import cell_codes, object_code, pixel_boxes, pixel_labels

    patch = encoder.vision_config.patch_size
    cell, grid = patch * encoder.projector.config.downsample_ratio, encoder.vision_config.grid_side
    code_KD = object_code(encoder.projector.config.n_embed, box_bins)
    codes = []
    for record in records:
        rgb = np.array(Image.open(record.images[0]).convert("RGB"))
        labels = pixel_labels(rgb, record.meta["objects"])
        boxes = pixel_boxes(labels, record.meta["objects"], rgb.shape[:2], grid)
        codes.append(cell_codes(labels[None], boxes[None], code_KD, cell, grid, box_bins, code_pool)[0])
    codes_NLD = torch.stack(codes)
    return codes_NLD - codes_NLD.mean(dim=1, keepdim=True) if encoder.center_tokens else codes_NLD


def tokens_and_targets(model, records, size: int, tokens: str, normalize: bool = False,
                       box_bins: int = 10, code_pool: str = "share") -> tuple[np.ndarray, np.ndarray]:
    from envs.scene import COLOURS, SHAPES
    from envs.scene_language import to_det

    encoder, feats, targets = model.vision_encoder, [], []
    grid = encoder.vision_config.grid_side if tokens == "tower" else int(np.sqrt(encoder.tokens_per_tile))
    for first in range(0, len(records), 64):
        batch = records[first:first + 64]
        pixels = torch.stack([torch.from_numpy(np.array(Image.open(r.images[0]).convert("RGB"))).permute(2, 0, 1)
                              for r in batch]).float() / 255 * 2 - 1
        with torch.no_grad():
            tokens_NLD = (encoder.vision(pixel_values=pixels).last_hidden_state if tokens == "tower"
                          else code_tokens(encoder, batch, box_bins, code_pool) if tokens == "code"
                          else encoder.encode_tiles(pixels))
        if normalize:
            tokens_NLD = tokens_NLD / tokens_NLD.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        for record, tokens_LD in zip(batch, tokens_NLD):
            for obj in record.meta["objects"]:
                cx, cy = obj["center"]
                if not (0 <= cx < size and 0 <= cy < size):  # (a wrist frame shows part of it, its centre outside)
                    continue
                row, col = min(int(cy * grid / size), grid - 1), min(int(cx * grid / size), grid - 1)
                feats.append(tokens_LD[row * grid + col].numpy())
                colour_1h = np.eye(len(COLOURS))[list(COLOURS).index(obj["colour"])]
                shape_1h = np.eye(len(SHAPES))[SHAPES.index(obj["shape"])]
                targets.append(np.r_[to_det(obj["bbox"], size, size)[:2], colour_1h, shape_1h])
    return np.asarray(feats, dtype=np.float64), np.asarray(targets, dtype=np.float64)


def probe_scenes(folder: str, count: int, seed: int, size: int, camera: str = "top") -> list:
    """`count` 2-4-object scenes of both robots' envs (scene-language records), generated into `folder`; with
    `camera` "wrist" the arm's wrist frames (half of them started near an object, as the mini's vision_wrist part)."""
    from envs.scene_language import generate_scene_language, load_conversations

    wrist = camera == "wrist"
    return load_conversations(generate_scene_language(
        folder, "align", count, seed=seed, image_size=size, camera=camera,
        env_ids=["vla/ArmReach-v0"] if wrist else ["vla/ArmReach-v0", "vla/PointNav-v0"],
        env_kwargs={"num_objects": [2, 4]} | ({"near_start": 0.5} if wrist else {})))


def ridge(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray) -> np.ndarray:
    """Predictions for `X_test` of a ridge regression (standardized features, penalty 1) fit on the training pairs."""
    mean, scale = X_train.mean(0), X_train.std(0) + 1e-6
    A = np.c_[(X_train - mean) / scale, np.ones(len(X_train))]
    W = np.linalg.solve(A.T @ A + 1.0 * np.eye(A.shape[1]), A.T @ y_train)
    return np.c_[(X_test - mean) / scale, np.ones(len(X_test))] @ W


def place_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of (x1, y1) predictions in 0..999 units: the share within 40 units, and R^2."""
    within = (np.abs(pred - truth) <= 40).mean(0)
    r2 = 1 - ((pred - truth) ** 2).sum(0) / ((truth - truth.mean(0)) ** 2).sum(0)
    return within, r2


def main() -> None:
    from envs.scene import COLOURS
    from vla.policy.checkpoint import load_vl2_for_chat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=900_000)
    parser.add_argument("--tokens", choices=("adaptor", "tower", "code"), default="adaptor")
    parser.add_argument("--normalize", action="store_true")
    parser.add_argument("--box-bins", type=int, default=10)
    parser.add_argument("--code-pool", choices=("share", "object"), default="share")
    parser.add_argument("--camera", choices=("top", "wrist"), default="top")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_vl2_for_chat(args.checkpoint)
    size = model.vision_encoder.vision_config.image_size
    with tempfile.TemporaryDirectory() as tmp:
        records = probe_scenes(tmp, args.train + args.test, args.seed, size, args.camera)
        X_train, y_train = tokens_and_targets(model, records[:args.train], size, args.tokens, args.normalize, args.box_bins,
                                              args.code_pool)
        X_test, y_test = tokens_and_targets(model, records[args.train:], size, args.tokens, args.normalize, args.box_bins,
                                              args.code_pool)
    pred = ridge(X_train, y_train, X_test)
    within, r2 = place_scores(pred[:, :2], y_test[:, :2])
    n_colours = len(COLOURS)
    colour_acc = (pred[:, 2:2 + n_colours].argmax(1) == y_test[:, 2:2 + n_colours].argmax(1)).mean()
    shape_acc = (pred[:, 2 + n_colours:].argmax(1) == y_test[:, 2 + n_colours:].argmax(1)).mean()
    print(f"{'wrist camera, ' if args.camera == 'wrist' else ''}{args.tokens} tokens{' (unit norm)' if args.normalize else ''}, {len(y_test)} held-out objects ({len(y_train)} to fit): x1 within 40 units "
          f"{within[0]:.2f} (R^2 {r2[0]:.2f}), y1 within 40 {within[1]:.2f} (R^2 {r2[1]:.2f}); "
          f"colour {colour_acc:.2f}, shape {shape_acc:.2f}")


if __name__ == "__main__":
    main()
