"""One point of a sweep over the demo's vla stage, scored on validation seeds, never on the demo's held-out test seeds.

The demo's settings (configs/demo.yaml) with `SETTINGS` (a JSON object) on top: `steps`, `lr`, `vqa_ratio`,
`micro_batch`, `noise`, `label`... replace the demo's values (dicts merge); `episodes` sets every robot's
demonstrations, `arm_weight` the arm's share of the mixture, `arm_collect` env kwargs for the arm's demonstrations only
(e.g. `{"near_start": 0.3}`). The same robot datasets (the demo's seeds, cached under `--out` per episode count, noise,
label and collection kwargs) and co-training conversations as the demo, then its vla stage from the shipped mini, then:
  - success per robot on env seeds 5000+ (`--episodes`, 200 by default), told the target and told another object of the
    same scene (the wrong-instruction baseline); the demo's test seeds are 1000+;
  - scene VQA and grounding on 120 validation scenes (seeds 800,000+; the demo's held-out ones are 900,000+).
`--start-only` scores the starting checkpoint on the same validation scenes instead (what retention is measured against);
`--policy DIR` scores a policy checkpoint made elsewhere (e.g. by wise_ft.py) without training one; `--annotate CKPT`
trains on copies of the robot datasets whose boxes (`episode_targets`, what grounding first trains on) are not the
simulator's but `vla annotate`'s from the checkpoint CKPT, as for a dataset recorded elsewhere.

    python docs/experiments/vla_sweep.py NAME '{"steps": {"vla": 2500}, "vqa_ratio": 0.2}' [--out outputs/sweep]
    python docs/experiments/vla_sweep.py start --start-only

Each run appends one JSON line to `<out>/sweep.jsonl` and prints it last. Runs on one torch thread (`--threads`), so
that two can share a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

VAL_ENV_SEED, VAL_SCENE_SEED, VAL_SCENES = 5000, 800_000, 120


def demo_settings(overrides: dict) -> dict:
    from vla.commands.demo import _settings
    from vla.config import load_config

    c = _settings(load_config("demo"))
    for key, value in overrides.items():
        if key == "arm_weight":
            c["robots"] = [{**r, "weight": value} if r["name"] == "arm" else r for r in c["robots"]]
        elif key == "arm_collect":  # env kwargs for the arm's demonstrations only (e.g. near_start)
            c["robots"] = [{**r, "collect_env_kwargs": value} if r["name"] == "arm" else r for r in c["robots"]]
        elif key == "episodes":
            c["robots"] = [{**r, "episodes": int(value)} for r in c["robots"]]
        elif isinstance(value, dict):
            c[key] = {**c[key], **value}
        else:
            c[key] = value
    return c


def data(c: dict, out: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """The demo's robot datasets (cached per episode count) and its co-training conversations, plus the validation
    scenes."""
    from envs.scene_language import generate_scene_language
    from vla.commands.demo import collect, scene_language

    episodes = {int(r["episodes"]) for r in c["robots"]}
    collect_kwargs = "".join(f"-{k}{v}" for r in c["robots"] for k, v in (r.get("collect_env_kwargs") or {}).items())
    folder = out / ("data" + "-".join(str(e) for e in sorted(episodes)) + f"-noise{c['noise']:g}-{c['label']}{collect_kwargs}")
    if all((folder / "data" / r["name"] / "meta" / "collection.json").is_file() for r in c["robots"]):
        roots = {r["name"]: str(folder / "data" / r["name"]) for r in c["robots"]}
    else:
        roots = collect(c, folder)
    lang = {"sft": folder / "lang" / "sft" / "sft.jsonl", "eval": out / "val_lang" / "sft.jsonl"}
    if not lang["sft"].is_file():  # the demo's (its held-out "eval" scenes are made too, and not used here)
        lang["sft"] = scene_language(c, folder)["sft"]
    if not lang["eval"].is_file():
        lang["eval"] = generate_scene_language(lang["eval"].parent, "sft", VAL_SCENES, seed=VAL_SCENE_SEED,
                                               env_ids=[r["env"] for r in c["robots"]], image_size=int(c["image_size"]))
    return roots, lang


def annotated(roots: dict[str, str], folder: Path, checkpoint: str) -> dict[str, str]:
    """Copies of the datasets whose `episode_targets` are `vla annotate`'s answers from `checkpoint` (the simulator's
    boxes dropped; the collection seeds kept, so the held-out check still holds)."""
    from envs.collect import read_collection_record, write_collection_record
    from vla.cli import main as vla

    copies = {}
    for name, root in roots.items():
        copy = folder / name
        shutil.copytree(root, copy)
        record = read_collection_record(copy)
        del record["episode_targets"]
        write_collection_record(copy, record)
        if vla(["annotate", f"root={copy}", f"checkpoint={checkpoint}", "progress=false"]) != 0:
            raise SystemExit(f"vla annotate failed on {copy}")
        copies[name] = str(copy)
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name")
    parser.add_argument("settings", nargs="?", default="{}")
    parser.add_argument("--out", default="outputs/sweep")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--start-only", action="store_true")
    parser.add_argument("--policy", default=None, help="score this policy checkpoint instead of training one")
    parser.add_argument("--annotate", default=None, help="train on boxes `vla annotate` gets from this checkpoint")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import envs  # noqa: F401  (registers the built-in envs)
    from envs.rollout import evaluate
    from vla.commands import mini, register_env_policies
    from vla.commands.demo import _quiet_libraries, evaluate_language, train_vla

    register_env_policies()
    _quiet_libraries()
    overrides = json.loads(args.settings)
    c = demo_settings(overrides)
    out = Path(args.out)
    run = out / "runs" / args.name
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    roots, lang = data(c, out)
    if args.annotate:
        roots = annotated(roots, run / "data", args.annotate)
    start = str(mini.resolve(c["start"]))
    start_scenes = mini.trained_scene_keys(mini.verify(start))
    result: dict = {"name": args.name, "settings": overrides}
    if args.annotate:
        result["annotated_by"] = args.annotate
    if args.start_only:
        policy = start
    else:
        if args.policy:
            policy = args.policy
            result["policy"] = policy
        else:
            t0 = time.perf_counter()
            summary = train_vla(c, run, start, roots, lang)
            policy = summary["checkpoint"]
            result |= {"train_s": round(time.perf_counter() - t0), "final_loss": round(summary["final_loss"], 4)}
        for robot in c["robots"]:
            env_id = robot["env"]
            for instruction in ("target", "other"):
                kwargs = dict(robot.get("env_kwargs") or {}) | {"instruction": instruction}
                s = evaluate(f"checkpoint:{policy}", [env_id], episodes=args.episodes, batch_size=int(c["eval_batch"]),
                             seed=VAL_ENV_SEED, image_size=int(c["image_size"]), progress=False, videos=0,
                             env_kwargs={env_id: kwargs}, train_datasets=list(roots.values()))
                result[f"{robot['name']}_{instruction}"] = s["overall"]["success_rate"]
    language = evaluate_language(c, run, policy, lang, roots, start_scenes)
    result |= {"vqa": round(language["vqa_accuracy"], 4), "grounding": round(language["grounding_acc"], 4),
               "questions": language["n_vqa"], "boxes": language["n_grounding"]}
    with open(out / "sweep.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
