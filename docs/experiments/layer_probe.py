"""Where does the language model lose where an object is? The ridge probe of `token_probe.py` (its code: x1, y1 of
an object's box, 0..999), read off the language model's residual stream while it answers "Locate <|ref|>the <object><|/ref|> in
the given image." with the true answer teacher-forced up to `[[`: at the image token that holds the object's centre
(the global view's 4x4 grid), as the language model gets it and after each of its layers, and at the `[[` position,
after each layer (where the first digit of x1 is read off). One object per scene (its first), fit on `--train`
scenes, scored on `--test` others. Also the mean norm of the image tokens, of the text tokens, and of what each layer
adds at the image positions.

    python docs/experiments/layer_probe.py checkpoints/dsvl2-mini [--train 1000 --test 300]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch


def locate_up_to_x1(model, processor, record, size: int) -> dict:
    """Run the model on "Locate <|ref|>the <first object><|/ref|> in the given image." with the true answer
    teacher-forced up to `[[` (where x1's first digit is read off); the processed batch."""
    from PIL import Image

    from envs.scene_language import grounding_answer, to_det

    obj = record.meta["objects"][0]
    ref = f"the {obj['name']}"
    question = f"<image>\nLocate <|ref|>{ref}<|/ref|> in the given image."
    prefix = grounding_answer(ref, to_det(obj["bbox"], size, size)).split("[[")[0] + "[["
    batch = processor([{"role": "user", "content": question}, {"role": "assistant", "content": prefix}],
                      [Image.open(record.images[0]).convert("RGB")])
    with torch.no_grad():
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "images", "images_seq_mask",
                                       "images_spatial_crop")}, compute_logits=False)
    return batch


def load_probed(checkpoint: str):
    """(model, processor, image size) of a DeepSeek-VL2 folder, in eval mode, on one thread."""
    from vla.policy.checkpoint import load_vl2_for_chat

    torch.set_num_threads(1)
    model, processor = load_vl2_for_chat(checkpoint)
    model.eval()
    return model, processor, model.vision_encoder.vision_config.image_size


def residuals(model, processor, records, size: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """{"token": (N, 1 + layers, D), "answer": (N, layers, D)}, targets (N, 2) x1 y1 in 0..999, norms (3 + layers,)."""
    from envs.scene_language import to_det

    layers = model.language.model.layers
    seen: dict = {}
    hooks = [layers[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0][0]))]
    for i, layer in enumerate(layers):
        def keep(module, inputs, output, i=i):
            seen[i] = (output[0] if isinstance(output, tuple) else output)[0]
        hooks.append(layer.register_forward_hook(keep))
    grid = int(np.sqrt(model.vision_encoder.tokens_per_tile))
    feats: dict[str, list] = {"token": [], "answer": []}
    targets, norms = [], []
    for record in records:
        obj = record.meta["objects"][0]
        det = to_det(obj["bbox"], size, size)
        batch = locate_up_to_x1(model, processor, record, size)
        image_at = batch["images_seq_mask"][0].nonzero().flatten()
        cx, cy = obj["center"]
        row, col = min(int(cy * grid / size), grid - 1), min(int(cx * grid / size), grid - 1)
        at = int(image_at[row * (grid + 1) + col])  # the global view: rows of `grid` tokens and a newline
        steps = [seen["in"]] + [seen[i] for i in range(len(layers))]
        feats["token"].append(torch.stack([s[at] for s in steps]).numpy())
        feats["answer"].append(torch.stack([s[-1] for s in steps[1:]]).numpy())
        targets.append(det[:2])
        is_image = batch["images_seq_mask"][0]
        norms.append([float(seen["in"][is_image].norm(dim=-1).mean()), float(seen["in"][~is_image].norm(dim=-1).mean())]
                     + [float((b - a)[is_image].norm(dim=-1).mean()) for a, b in zip(steps, steps[1:])])
    for hook in hooks:
        hook.remove()
    return ({k: np.asarray(v, dtype=np.float64) for k, v in feats.items()}, np.asarray(targets, dtype=np.float64),
            np.asarray(norms).mean(0))


def main() -> None:
    from token_probe import place_scores, probe_scenes, ridge  # this folder's

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--seed", type=int, default=900_000)
    args = parser.parse_args()
    model, processor, size = load_probed(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        records = probe_scenes(tmp, args.train + args.test, args.seed, size)
        train, y_train, norms = residuals(model, processor, records[:args.train], size)
        test, y_test, _ = residuals(model, processor, records[args.train:], size)
    print(f"{args.checkpoint}: {len(y_test)} held-out objects ({len(y_train)} to fit)")
    print(f"mean norm: image tokens {norms[0]:.2f}, text tokens {norms[1]:.2f}; added at the image positions by layer "
          + ", ".join(f"{i}: {v:.2f}" for i, v in enumerate(norms[2:])))
    print("| residual stream | x1 within 40 | x1 R^2 | y1 within 40 | y1 R^2 |\n|---|---|---|---|---|")
    for where, X_tr in train.items():
        for step in range(X_tr.shape[1]):
            within, r2 = place_scores(ridge(X_tr[:, step], y_train, test[where][:, step]), y_test)
            name = (("object's token, as the language model gets it" if step == 0 else f"object's token after layer {step - 1}")
                    if where == "token" else f"`[[` after layer {step}")
            print(f"| {name} | {within[0]:.2f} | {r2[0]:.2f} | {within[1]:.2f} | {r2[1]:.2f} |")


if __name__ == "__main__":
    main()
