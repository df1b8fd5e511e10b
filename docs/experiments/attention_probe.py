"""Does the language model look at the named object when it spells its box? The prompt of `layer_probe.py` ("Locate
<|ref|>the <object><|/ref|> in the given image.", true answer teacher-forced up to `[[`); for each of the answer's
last positions (`the <colour> <shape> <|/ref|> <|det|> [[`; x1's first digit is read off at `[[`), every layer and
every head: the attention weight on the image tokens whose cell holds the named object, on those holding only the
scene's other objects, and on the image as a whole (both views of the 4x4 grid). Per image token, so that a head
looking everywhere gives the same for named and other cells: named well above other is what says "it finds the
object". The table shows, per position and layer, the head that favours the named object most.

    python docs/experiments/attention_probe.py checkpoints/dsvl2-mini [--scenes 200]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch


def cells_of(bbox: list[float], size: int, grid: int) -> set[int]:
    """Grid cells (row * grid + col) that a pixel box overlaps."""
    x1, y1, x2, y2 = bbox
    cell = size / grid
    cols = range(int(x1 // cell), min(int((x2 - 1e-6) // cell), grid - 1) + 1)
    rows = range(int(y1 // cell), min(int((y2 - 1e-6) // cell), grid - 1) + 1)
    return {r * grid + c for r in rows for c in cols}


LAST = 6  # the answer's last positions: the, colour, shape, <|/ref|>, <|det|>, [[


def attention_at_last(model, processor, records, size: int) -> np.ndarray:
    """(scenes, positions, layers, heads, 3): mean weight per image token on the named object's cells, on the other
    objects' cells, on all image tokens; from each of the answer's `LAST` positions."""
    from backbone.attention import MultiHeadLatentAttention
    from layer_probe import locate_up_to_x1  # this folder's

    seen: dict[int, torch.Tensor] = {}
    original = MultiHeadLatentAttention._expanded

    def keep(self, q_nope, q_pe, c_kv, k_pe, *args, **kwargs):
        B, H, T, N = q_nope.shape
        k_nope = self.kv_b_proj(c_kv).view(B, T, H, -1).transpose(1, 2)[..., :N]
        q = torch.cat((q_nope, q_pe), dim=-1)[:, :, -LAST:]  # (B, H, LAST, C)
        k = torch.cat((k_nope, k_pe[:, None].expand(B, H, T, -1)), dim=-1)
        logits = torch.einsum("bhqc,bhtc->bhqt", q, k) * self.softmax_scale
        causal = torch.arange(T)[None, :] > torch.arange(T - LAST, T)[:, None]
        seen[self.layer_idx] = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1)[0]  # (H, LAST, T)
        return original(self, q_nope, q_pe, c_kv, k_pe, *args, **kwargs)

    grid = int(np.sqrt(model.vision_encoder.tokens_per_tile))
    out = []
    MultiHeadLatentAttention._expanded = keep
    try:
        for record in records:
            objects = record.meta["objects"]
            target = objects[0]
            batch = locate_up_to_x1(model, processor, record, size)
            image_at = batch["images_seq_mask"][0].nonzero().flatten().tolist()
            # each view is `grid` rows of `grid` tokens and a newline (plus one separator between views)
            views = [image_at[i:i + grid * (grid + 1)] for i in range(0, len(image_at) - grid, grid * (grid + 1) + 1)]
            named = cells_of(target["bbox"], size, grid)
            others = set().union(*(cells_of(o["bbox"], size, grid) for o in objects[1:])) - named

            def at(cells):
                return [view[(c // grid) * (grid + 1) + c % grid] for view in views for c in sorted(cells)]

            out.append([[[[float(seen[layer][h, q, at(named)].mean()) if named else 0.0,
                            float(seen[layer][h, q, at(others)].mean()) if others else np.nan,
                            float(seen[layer][h, q, image_at].mean())] for h in range(seen[layer].shape[0])]
                          for layer in sorted(seen)] for q in range(LAST)])
    finally:
        MultiHeadLatentAttention._expanded = original
    return np.asarray(out)


def main() -> None:
    from layer_probe import load_probed
    from token_probe import probe_scenes  # this folder's

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=900_000)
    args = parser.parse_args()
    model, processor, size = load_probed(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        weights = attention_at_last(model, processor, probe_scenes(tmp, args.scenes, args.seed, size), size)
    mean = np.nanmean(weights, axis=0)  # (positions, layers, heads, 3)
    print(f"{args.checkpoint}: attention per image token x 100, mean over {len(weights)} held-out scenes: named "
          "object's cells / other objects' cells / any image token (head h that favours the named object most)")
    print("| answer position | " + " | ".join(f"layer {i}" for i in range(mean.shape[1])) + " |")
    print("|---|" + "---|" * mean.shape[1])
    for q, name in enumerate(["the", "colour", "shape", "<|/ref|>", "<|det|>", "[["]):
        best = [heads[np.argmax(heads[:, 0] - heads[:, 1])] for heads in mean[q]]
        cells = [f"{100 * n:.1f} / {100 * o:.1f} / {100 * a:.1f} (h{int(np.argmax(h[:, 0] - h[:, 1]))})"
                 for (n, o, a), h in zip(best, mean[q])]
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
