"""The mini DeepSeek-VL2 checkpoint the demo starts from (`checkpoints/dsvl2-mini`), made by the project's own code on
the project's own scene-language data, the way DeepSeek-VL2 was made at full size (a tower first, then the stages):

1. scenes: 2-4-object frames of the robots' envs with their ground truth, from recorded seeds (`SEEDS`); for stage
   vision also the arm's wrist-camera frames (`mini.scenes.vision_wrist`, with `mini.camera_env_kwargs`);
2. a byte-level BPE tokenizer with DeepSeek-VL2's special tokens, trained on the scenes' texts and the robots' tasks;
3. stage vision: the SigLIP tower alone, on per-pixel colour / shape labels read off the rendered frames and the box
   of the object drawn at each pixel (so each image token carries where its object is), and SigLIP's sigmoid caption
   loss at `mini.vision_data.contrastive_weight` (0 in the shipped recipe: docs/experiments.md, "The tower at scale",
   "A tower the language model can read" and "Boxes in the tower's tokens", for why); with
   `mini.vision_data.adaptor_weight` it also trains the adaptor to name each token cell's objects;
4. align -> pretrain -> sft: the adaptor and the language model learn to read the tower (the tower at
   `mini.tower_lr_mult`, the recipe's 0.1 for a pretrained tower; the adaptor at `mini.adaptor_lr_mult`, 0 = frozen);
5. scored on held-out scenes (seeds no stage saw): scene VQA and grounding.

The folder is an official-format DeepSeek-VL2 checkpoint (config.json, model.safetensors, the tokenizer) plus
`made_by.json`: the settings, the data seeds, the commit, the command and the wall time that made it, its held-out
scores, and every file's size and sha256 (`verify` checks them before anything loads it).

    vla demo demo.from_scratch=true                      # rebuilds it into <out>/dsvl2-mini, then the demo from it
    cp outputs/demo/dsvl2-mini/* checkpoints/dsvl2-mini/  # ship the rebuilt one
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MADE_BY = "made_by.json"
# where each part of the data starts (record i of a part shows env seed `seed + i`); the demo's own scenes use seeds
# below 100,000 and its held-out ones 900,000+, so no scene is shared
SEEDS = {"vision": 100_000, "align": 200_000, "pretrain": 300_000, "sft": 400_000, "eval": 800_000,
         "vision_wrist": 500_000}
STAGE_OF = {"vision": "align", "align": "align", "pretrain": "pretrain", "sft": "sft", "eval": "sft",
            "vision_wrist": "align"}  # record kinds
# parts of the data shot by another camera than the top one (stage vision's only: what the language stages and the
# held-out scores read is the top camera's)
CAMERA_OF = {"vision_wrist": "wrist"}
WEIGHT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class MiniCheckpointError(RuntimeError):
    """The starting checkpoint is missing, incomplete or does not match what its made_by.json records."""


def verify(folder: str | Path) -> dict[str, Any]:
    """made_by.json of `folder` after checking every file it lists (size and sha256); one-line error otherwise."""
    from vla.train.checkpoint import CheckpointCorrupt, check_files

    folder = resolve(folder)
    if not (folder / MADE_BY).is_file():
        raise MiniCheckpointError(f"{folder}: no {MADE_BY} (not a checkpoint made by `vla demo demo.from_scratch=true`; "
                                  f"rebuild it with that command)")
    try:
        made_by = json.loads((folder / MADE_BY).read_text())
        check_files(folder, made_by["files"])
    except (json.JSONDecodeError, KeyError) as e:
        raise MiniCheckpointError(f"{folder / MADE_BY}: unreadable ({e})") from e
    except CheckpointCorrupt as e:
        raise MiniCheckpointError(f"{e} (rebuild with `vla demo demo.from_scratch=true`)") from e
    return made_by


def resolve(folder: str | Path) -> Path:
    """`folder` as given, or, when relative and not found from here, relative to the repository (where
    `checkpoints/dsvl2-mini` ships), so the demo's default start works from any working directory."""
    folder = Path(folder)
    beside = Path(__file__).resolve().parents[2] / folder
    return beside if not folder.is_absolute() and not folder.exists() and beside.exists() else folder


def plan_scene_keys(plan: dict[str, Any]) -> set[tuple[str, int]]:
    """(env id, seed) of every scene of one part of the data plan (record i: env i mod the envs, seed `seed + i`, as
    `envs.scene_language.generate_scene_language` makes them)."""
    return {(plan["envs"][i % len(plan["envs"])], plan["seed"] + i) for i in range(plan["count"])}


def trained_scene_keys(made_by: dict[str, Any]) -> set[tuple[str, int]]:
    """(env id, seed) of every scene the checkpoint was trained on, from its recorded data plan."""
    return set().union(*(plan_scene_keys(plan) for part, plan in made_by["data"].items() if part != "eval"))


def scenes(plan: dict[str, Any], out: Path) -> Path:
    """Generate the records of one part of the data plan ({"stage", "seed", "count", "envs", "num_objects",
    "image_size"}, optionally "camera" and "env_kwargs") into `out`; returns the JSONL."""
    from envs.scene_language import generate_scene_language

    return generate_scene_language(out, plan["stage"], plan["count"], seed=plan["seed"], env_ids=plan["envs"],
                                   image_size=plan["image_size"], camera=plan.get("camera", "top"),
                                   env_kwargs={"num_objects": plan["num_objects"], **plan.get("env_kwargs", {})})


def envs_with_camera(env_ids: list[str], camera: str) -> list[str]:
    """The envs of `env_ids` whose robot has `camera`."""
    import gymnasium as gym

    import envs  # noqa: F401  (registers the built-in envs)

    out = []
    for env_id in env_ids:
        env = gym.make(env_id)
        if camera in env.unwrapped.embodiment.camera_names:
            out.append(env_id)
        env.close()
    return out


def score(folder: str | Path, eval_jsonl: str | Path, limit: int | None = None) -> dict[str, Any]:
    """Scene VQA and grounding of the checkpoint in `folder` on held-out records (the first `limit`)."""
    from envs.scene_language import load_conversations
    from vla.commands.vqa import evaluate_scene_vqa
    from vla.policy.checkpoint import load_vl2_for_chat

    records = load_conversations(eval_jsonl)[:limit]
    model, processor = load_vl2_for_chat(folder)
    result = evaluate_scene_vqa(model, processor, records, progress=False)
    return {"vqa_accuracy": round(result["vqa_accuracy"], 4), "grounding_acc": round(result["grounding_acc"], 4),
            "n_vqa": result["n_vqa"], "n_grounding": result["n_grounding"], "records": len(records),
            "by_kind": {k: round(v["accuracy"], 4) for k, v in result["by_kind"].items()}}


def build_tokenizer(c: dict[str, Any], lang: dict[str, Path], out: Path) -> Path:
    """A byte-level BPE with every DeepSeek-VL2 special token, trained on the texts of the align, pretrain and sft
    scenes (the robots' tasks included), saved to `out / "tokenizer"`."""
    from backbone.tokenizer import BUILTIN_CORPUS, build_bpe_tokenizer
    from envs.scene_language import load_conversations

    texts = BUILTIN_CORPUS.splitlines()
    for stage in ("align", "pretrain", "sft"):
        for record in load_conversations(lang[stage], check_images=False):
            texts += [m["content"].replace("<image>", "") for m in record.conversation]
            texts.append(record.meta.get("task", ""))
    tokenizer = build_bpe_tokenizer(texts, vocab_size=int(c["tokenizer_vocab"]))
    folder = out / "tokenizer"
    tokenizer.save(folder)
    return folder


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head.stdout.strip() + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def build(c: dict[str, Any], out: Path, say=print) -> Path:
    """Make the mini checkpoint with the demo settings `c` (its `mini` section, `model`, `seed`, `image_size`,
    `tokenizer_vocab`, the robots' envs) under `out` (scenes, stage runs) into `out.parent / "dsvl2-mini"`."""
    from vla.commands.demo import train_stage

    start, m = time.time(), c["mini"]
    env_ids = sorted({r["env"] for r in c["robots"]})
    plan = {part: {"stage": STAGE_OF[part], "seed": SEEDS[part], "count": int(m["scenes"][part]), "envs": env_ids,
                   "num_objects": list(m["num_objects"]), "image_size": int(c["image_size"])}
            for part in SEEDS if m["scenes"].get(part, 0) > 0}
    for part in set(plan) & set(CAMERA_OF):  # e.g. the arm's wrist frames, placed near objects (`camera_env_kwargs`)
        seen_by = envs_with_camera(env_ids, CAMERA_OF[part])
        if not seen_by:
            raise ValueError(f"mini.scenes.{part}: none of the robots' envs ({', '.join(env_ids)}) has a "
                             f"{CAMERA_OF[part]} camera")
        plan[part] |= {"envs": seen_by, "camera": CAMERA_OF[part], "env_kwargs": dict(m.get("camera_env_kwargs") or {})}
    paths = {part: scenes(p, out / "scenes" / part) for part, p in plan.items()}
    tokenizer = build_tokenizer(c, paths, out)
    say(f"mini: {sum(p['count'] for p in plan.values())} scenes generated, tokenizer of {c['tokenizer_vocab']} tokens")
    # the stages with the mini's own steps, learning rates, batch sizes and tower
    mc = {**c, "steps": m["steps"], "lr": m["lr"]}
    # the random init (stage vision) takes the model's centring of image tokens; the later stages read it off the folder
    summary = train_stage({**mc, "micro_batch": m["micro_batch"]["vision"],
                           "center_image_tokens": m.get("center_image_tokens")}, out, "vision", None,
                          {"data": {"path": [str(paths[p]) for p in ("vision", "vision_wrist") if p in paths],
                                    "image_size": c["image_size"], **m["vision_data"]}},
                          tokenizer=tokenizer)
    init, losses = summary["checkpoint"], {"vision": summary["final_loss"]}
    # the adaptor's lr there, relative: 0 keeps the one stage vision made (`vision_data.adaptor_weight`) frozen
    adaptor = float(m.get("adaptor_lr_mult", 1.0))
    for stage in ("align", "pretrain", "sft"):
        summary = train_stage({**mc, "micro_batch": m["micro_batch"]["language"]}, out, stage, init,
                              {"data": {"path": paths[stage], "image_size": c["image_size"]},
                               "lr_mult": {"vision_tower": float(m["tower_lr_mult"])}
                               | ({"projector": adaptor} if adaptor not in (0.0, 1.0) else {}),
                               **({"frozen": ["projector"]} if adaptor == 0 else {})})
        init, losses[stage] = summary["checkpoint"], summary["final_loss"]
    folder = out.parent / "dsvl2-mini"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in WEIGHT_FILES:
        shutil.copy2(Path(init) / name, folder / name)
    held_out = score(folder, paths["eval"])
    say(f"mini: held-out scene VQA {held_out['vqa_accuracy']:.2f} ({held_out['n_vqa']} questions), grounding "
        f"{held_out['grounding_acc']:.2f} ({held_out['n_grounding']} boxes)")
    from vla.train.checkpoint import file_records

    made_by = {
        "made_by": "vla demo demo.from_scratch=true (vla/commands/mini.py)",
        "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)),
        "commit": _commit(), "wall_s": round(time.time() - start, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {"mini": m, "model": c["model"], "vision": c["vision"], "seed": c["seed"], "image_size": c["image_size"],
                     "tokenizer_vocab": c["tokenizer_vocab"]},
        "data": plan, "final_loss": losses, "held_out": held_out,
        "files": file_records(folder, list(WEIGHT_FILES)),
    }
    (folder / MADE_BY).write_text(json.dumps(made_by, indent=2) + "\n")
    return folder


def check_scores(folder: str | Path, limit: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(recorded held-out scores, scores of the first `limit` held-out records regenerated from the recorded plan)."""
    folder, made_by = resolve(folder), verify(folder)
    with tempfile.TemporaryDirectory() as tmp:
        plan = dict(made_by["data"]["eval"], count=min(limit, made_by["data"]["eval"]["count"]))
        return made_by["held_out"], score(folder, scenes(plan, Path(tmp)))
