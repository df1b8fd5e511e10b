"""`vla bench cotrain [--quick] [start=DIR] [steps=N]`: what scene-VQA co-training buys the vla stage.

The demo's data and settings (`configs/demo.yaml`): the robot datasets, the scene-language data, then a shortened vla
stage run twice from the same starting checkpoint, once co-trained with scene VQA (the demo's `vqa_ratio`) and once
on robot data only (`vqa_ratio` 0), the same steps and seed. Each policy is rolled out on the demo's held-out seeds
(success per robot) and asked the held-out scene questions (VQA accuracy, grounding with one box at IoU >= 0.5),
beside the starting checkpoint's own VQA and grounding on the same scenes: co-training should keep what the start
knew; robot data alone lets it go.

`start`: an official-format DeepSeek-VL2 folder with its tokenizer (official weights, a VL stage's checkpoint); by
default the demo's own start, the shipped mini checkpoint (`checkpoints/dsvl2-mini`, checked against its
made_by.json, whose training scenes the held-out ones are checked against). `steps`: the vla stage's steps (0 = half the demo's). `--quick`: the demo's quick settings
(numbers meaningless), for CI.

Prints a table, then the JSON summary: `vqa_with`, `vqa_without`, `grounding_with`, `grounding_without`,
`success_with`, `success_without` ({robot: rate}), `start_vqa`, `start_grounding`, `steps`, `start`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from benchmarks._util import print_table, setup


def run(cfg) -> dict:
    import envs  # noqa: F401  (registers the built-in envs)
    from envs.rollout import evaluate
    from vla.commands import register_env_policies
    from vla.policy.checkpoint import resolve_vl2_folder
    from vla.config import load_config
    from vla.commands import mini
    from vla.commands.demo import EVAL_SEED, _quiet_libraries, _settings, collect, evaluate_language, scene_language, train_vla

    register_env_policies()  # policy=checkpoint:DIR

    setup(cfg)
    _quiet_libraries()
    c = _settings(load_config("demo", ["demo.quick=true"] if cfg.get("quick") else []))
    out = Path("outputs/bench/cotrain" + ("_quick" if cfg.get("quick") else ""))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = str(mini.resolve(cfg.get("start") or c["start"]))
    resolve_vl2_folder(start)  # a clear error before any work when it is not a checkpoint folder
    # the scenes the start was trained on, where it records them (the held-out ones must not be among them)
    trained = mini.trained_scene_keys(mini.verify(start)) if (Path(start) / mini.MADE_BY).is_file() else set()
    steps = int(cfg.get("steps") or 0) or max(1, int(c["steps"]["vla"]) // 2)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    roots = collect(c, out)
    lang = scene_language(c, out)
    seconds["data"] = time.perf_counter() - t0

    runs = {"with": float(c["vqa_ratio"]), "without": 0.0}
    success: dict[str, dict[str, float]] = {}
    language: dict[str, dict] = {"start": evaluate_language(c, _fresh(out / "eval" / "start"), start, lang, roots, trained)}
    for label, ratio in runs.items():
        t0 = time.perf_counter()
        policy = train_vla(c, out, start, roots, lang, run_name=f"vla-{label}", vqa_ratio=ratio, steps=steps)["checkpoint"]
        seconds[f"vla {label}"] = time.perf_counter() - t0
        for robot in c["robots"]:
            env_id = robot["env"]
            summary = evaluate(f"checkpoint:{policy}", [env_id], episodes=int(c["eval_episodes"]),
                               batch_size=int(c["eval_batch"]), seed=EVAL_SEED, image_size=int(c["image_size"]),
                               progress=False, videos=0, out=out / "eval" / f"{label}-{robot['name']}", env_kwargs={env_id: dict(robot.get("env_kwargs") or {})},
                               train_datasets=list(roots.values()))
            success.setdefault(label, {})[robot["name"]] = summary["overall"]["success_rate"]
        language[label] = evaluate_language(c, _fresh(out / "eval" / label), policy, lang, roots, trained)

    names = [r["name"] for r in c["robots"]]
    print(f"vla stage from {start}: {steps} steps with scene VQA at {runs['with']:.0%} of the samples and without; "
          f"{c['eval_episodes']} held-out episodes per robot, {language['start']['n_vqa']} held-out questions")
    rows = [["start checkpoint", *["-" for _ in names], f"{language['start']['vqa_accuracy']:.2f}",
             f"{language['start']['grounding_acc']:.2f}", "-"]]
    for label in runs:
        rows.append([f"vla {label} co-training", *[f"{success[label][n]:.2f}" for n in names],
                     f"{language[label]['vqa_accuracy']:.2f}", f"{language[label]['grounding_acc']:.2f}",
                     f"{seconds[f'vla {label}']:.0f}"])
    print_table(["run", *[f"{n} success" for n in names], "VQA", "grounding", "train s"], rows)
    return {"vqa_with": round(language["with"]["vqa_accuracy"], 4),
            "vqa_without": round(language["without"]["vqa_accuracy"], 4),
            "grounding_with": round(language["with"]["grounding_acc"], 4),
            "grounding_without": round(language["without"]["grounding_acc"], 4),
            "success_with": success["with"], "success_without": success["without"],
            "start_vqa": round(language["start"]["vqa_accuracy"], 4),
            "start_grounding": round(language["start"]["grounding_acc"], 4),
            "steps": steps, "vqa_ratio": runs["with"], "start": str(start),
            "seconds": {k: round(v, 1) for k, v in seconds.items()}, "quick": bool(cfg.get("quick"))}


def _fresh(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
