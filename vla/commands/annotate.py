"""`vla annotate`: where each episode's named object is, for a LeRobotDataset made elsewhere, from a DeepSeek-VL2
checkpoint's grounding answers.

    vla annotate root=data/my_arm checkpoint=/path/to/deepseek-vl2-tiny          # ref from each task: "the ..."
    vla annotate root=data/my_arm checkpoint=... "ref_pattern='(the \\w+ block)'"  # a regex's first group (quoted
                                                                                #  twice: hydra reads (...) only quoted)
    vla annotate root=data/pusht checkpoint=... 'ref=the T-shaped block'          # one object for every episode
    vla annotate root=data/my_arm checkpoint=... compare=true                     # score against the boxes recorded

A policy that grounds before it acts (`policy: {ground_target: true}`, the demo's) trains on the box of the object
each episode's instruction names, at the episode's first frame in its robot's first camera (`episode_targets` in
`meta/collection.json`: `{"ref": "the red triangle", "det": [x1, y1, x2, y2]}`, 0..999). `vla collect` records them
from the simulator; a dataset recorded elsewhere has none. This command asks the checkpoint DeepSeek-VL2's grounding
question ("Locate <|ref|>REF<|/ref|> in the given image.") on each episode's first frame, where REF comes from the
episode's task (`ref_pattern`, or `ref` for all), and writes the answers' boxes: an episode whose task gives no REF,
or whose answer holds no box or several, gets null (trained without the grounding term). The record notes the
checkpoint, camera and pattern. `compare=true` writes nothing and scores the answers against the boxes the dataset
already records (IoU >= 0.5), e.g. a checkpoint's grounding on episodes labelled by hand.

Prints one JSON line: episodes, boxes, no_ref, no_box, camera (and with compare: agreement, compared).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

def ref_of(task: str, ref: str | None, pattern: re.Pattern) -> str | None:
    """The referring expression of one episode: `ref` if given, else the first group (or the whole match) of
    `pattern` in the task; None when it does not match."""
    if ref:
        return ref
    found = pattern.search(str(task).strip())
    if found is None:
        return None
    return (found.group(1) if pattern.groups else found.group(0)).strip() or None


def main(cfg) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from PIL import Image
    from tqdm import tqdm

    from backbone.grounding import locate_prompt, parse_grounding
    from envs.collect import EPISODE_TARGETS, read_collection_record, write_collection_record
    from envs.mixture import MixtureDataset
    from envs.scene_language import score_answer
    from vla.commands.vqa import answer
    from vla.policy.checkpoint import load_vl2_for_chat

    root = Path(cfg.root)
    record = read_collection_record(root) or {}
    recorded = record.get(EPISODE_TARGETS)
    if cfg.compare and not recorded:
        raise ValueError(f"annotate: {root} records no {EPISODE_TARGETS} to compare with (compare=true scores against "
                         f"them)")
    if recorded and not cfg.compare and not cfg.overwrite:
        raise FileExistsError(f"{root}: meta/collection.json already records {EPISODE_TARGETS}; overwrite=true "
                              f"replaces them, compare=true scores the checkpoint against them")
    try:
        pattern = re.compile(str(cfg.ref_pattern))
    except re.error as error:
        raise ValueError(f"annotate: ref_pattern {cfg.ref_pattern!r} is not a regular expression ({error})") from None

    member = MixtureDataset([str(root)]).members[0]  # the robot as training reads it: its first camera
    camera = cfg.camera or member.embodiment.cameras[0]
    if camera not in member.camera_keys.values():
        raise ValueError(f"annotate: {root} has no camera {camera!r}; it has {sorted(member.camera_keys.values())}")
    dataset = member.dataset
    starts = [int(i) for i in dataset.meta.episodes["dataset_from_index"]]
    episodes = [int(i) for i in dataset.meta.episodes["episode_index"]]
    if cfg.max_episodes:
        starts, episodes = starts[: int(cfg.max_episodes)], episodes[: int(cfg.max_episodes)]

    model, processor = load_vl2_for_chat(cfg.checkpoint)
    targets: list[dict | None] = [None] * (max(episodes) + 1 if episodes else 0)
    answers: dict[int, tuple[str, str]] = {}  # episode -> (ref, the checkpoint's answer)
    no_ref = no_box = 0
    for episode, start in tqdm(list(zip(episodes, starts)), desc="annotate", unit="episode", disable=not cfg.progress):
        item = dataset[start]
        ref = ref_of(item["task"], cfg.ref, pattern)
        if ref is None:
            no_ref += 1
            continue
        pixels_HWC = (item[camera].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        text = answer(model, processor, locate_prompt(ref), [Image.fromarray(pixels_HWC)],
                      max_new_tokens=int(cfg.max_new_tokens), prefill_chunk_size=0)
        answers[episode] = (ref, text)
        boxes = parse_grounding(text).boxes
        if len(boxes) != 1:
            no_box += 1
            continue
        targets[episode] = {"ref": ref, "det": [int(round(v)) for v in boxes[0]]}

    summary = {"episodes": len(episodes), "boxes": sum(t is not None for t in targets), "no_ref": no_ref,
               "no_box": no_box, "camera": camera}
    if no_ref == len(episodes):
        raise ValueError(f"annotate: no episode's task gives a referring expression with ref_pattern "
                         f"{cfg.ref_pattern!r} (e.g. task {str(dataset[starts[0]]['task'])!r}); set ref_pattern, or "
                         f"ref=... for every episode")
    if cfg.compare:
        # right: the same object, and the answer scored as the held-out grounding questions are (one box, IoU >= 0.5)
        pairs = [(answers.get(e), recorded[e]) for e in episodes if e < len(recorded) and recorded[e]]
        hits = sum(a is not None and a[0] == r["ref"] and score_answer(a[1], {"kind": "grounding", "det": r["det"]})
                   for a, r in pairs)
        summary |= {"compared": len(pairs), "agreement": round(hits / max(len(pairs), 1), 4)}
    else:
        record[EPISODE_TARGETS] = targets
        record["annotated"] = {"checkpoint": str(cfg.checkpoint), "camera": camera, "ref": cfg.ref,
                               "ref_pattern": None if cfg.ref else str(cfg.ref_pattern), **summary}
        summary["out"] = str(write_collection_record(root, record))
    print(json.dumps(summary))
    return 0
