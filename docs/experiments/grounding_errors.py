"""Where a checkpoint's boxes go wrong: on held-out grounding questions, the share of answers whose x1 (column) and y1
(row) are within 40 of the 0..999 units of the true box, and whose width and height are within 20 (an object is
~110-140 units wide; IoU >= 0.5 needs about all three).

    python docs/experiments/grounding_errors.py checkpoints/dsvl2-mini --scenes 100

The held-out scenes are the checkpoint's own (its made_by.json's eval plan, regenerated), or `--jsonl` a file of
envs.scene_language records.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    from envs.scene_language import load_conversations, parse_grounding, scored_turns
    from vla.commands import mini
    from vla.commands.vqa import answer
    from vla.policy.checkpoint import load_vl2_for_chat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--jsonl", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = load_vl2_for_chat(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        if args.jsonl:
            path = args.jsonl
        else:
            plan = dict(mini.verify(args.checkpoint)["data"]["eval"])
            path = mini.scenes(dict(plan, count=min(args.scenes, plan["count"])), Path(tmp))
        records = load_conversations(path)[: args.scenes]
        counts = {"boxes": 0, "x1": 0, "y1": 0, "size": 0}
        for record, question, meta in scored_turns(records):
            if meta["kind"] != "grounding":
                continue
            text = answer(model, processor, question, [record.images[0]], max_new_tokens=40, prefill_chunk_size=0)
            boxes = [box for _, group in parse_grounding(text) for box in group]
            if not boxes:
                continue
            (x1, y1, x2, y2), (t1, u1, t2, u2) = boxes[0], meta["det"]
            counts["boxes"] += 1
            counts["x1"] += abs(x1 - t1) <= 40
            counts["y1"] += abs(y1 - u1) <= 40
            counts["size"] += abs((x2 - x1) - (t2 - t1)) <= 20 and abs((y2 - y1) - (u2 - u1)) <= 20
    n = max(counts["boxes"], 1)
    print(f"{counts['boxes']} boxes ({len(records)} held-out scenes): x1 within 40 units {counts['x1'] / n:.2f}, "
          f"y1 within 40 {counts['y1'] / n:.2f}, width and height within 20 {counts['size'] / n:.2f}")


if __name__ == "__main__":
    main()
