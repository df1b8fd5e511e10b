"""Held-out binding of a `vla train stage=vision` checkpoint: how often an image's own caption outscores all of its
hard negatives (binding_acc, chance 1 / (1 + K)) and retrieval among a batch of 32, on 2-4-object scenes of seeds
the stage never saw (700,000+); for a tower trained with per-pixel labels (stage.data.dense_weight > 0), also the
share of object pixels whose colour and shape it names right, and with box labels (stage.data.box_weight > 0) the
share of object pixels whose predicted object box has IoU >= 0.5 with the true one. Terms a tower was not trained
with print as nan.

    python docs/experiments/vision_heldout.py runs/vision/checkpoints/step-00001500 [--scenes 256]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from envs.scene_language import generate_scene_language
from vla.train.stages import StageContext, make_stage_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--scenes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=700_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = generate_scene_language(tmp, "align", args.scenes, seed=args.seed, image_size=64,
                                       env_kwargs={"num_objects": [2, 4]})
        import json

        # the stage's own data settings (text tower size, dense labels), with the held-out scenes as its data
        trained = json.loads((Path(args.checkpoint) / "train_state.json").read_text())["config"]["stage"]["data"]
        data = {k: v for k, v in trained.items() if k not in ("path", "generate", "num_objects")} | {"path": str(path)}
        task = make_stage_task(StageContext(name="vision", out_dir=Path(tmp), init_from=args.checkpoint, data=data))
        task.load_weights(Path(args.checkpoint))
        task.module.eval()
        scores = []
        with torch.no_grad():
            for first in range(0, args.scenes - 31, 32):
                metrics = task.loss(task.module, task.collate([task.sample(i) for i in range(first, first + 32)])).metrics
                scores.append([metrics.get(k, float("nan")) for k in
                               ("binding_acc", "retrieval_acc", "dense_acc", "colour_acc", "shape_acc", "box_iou50")])
    binding, retrieval, dense_acc, colour_acc, shape_acc, box = np.mean(scores, axis=0)
    print(f"held-out binding_acc {binding:.3f}, retrieval among 32 {retrieval:.3f}, per-pixel colour+shape on object "
          f"pixels {dense_acc:.3f} (colour {colour_acc:.3f}, shape {shape_acc:.3f}), object box IoU >= 0.5 on object "
          f"pixels {box:.3f} ({32 * len(scores)} scenes)")


if __name__ == "__main__":
    main()
