"""`vla demo`: one command fine-tunes a DeepSeek-VL2 checkpoint into a VLA, rolls it out, and asks it about scenes.

1. Collect scripted demonstrations for two robots with different action sizes and rates into LeRobotDatasets.
2. Start from the shipped mini DeepSeek-VL2 checkpoint (`checkpoints/dsvl2-mini`, checked against its made_by.json),
   as a user starts from the official weights; `demo.from_scratch=true` first rebuilds it with the project's own code
   (vla/commands/mini.py: tower, align -> pretrain -> sft). Then the vla stage on the robot mixture, co-trained with
   scene VQA.
3. Evaluate on held-out seeds: the policy per robot against the random and no-vision (action prior) baselines; scene
   VQA accuracy and grounding (exactly one box, IoU >= 0.5) on held-out scenes; expert routing per robot (measured
   on training frames).
4. Write `<out>/report.md` (table, loss curves, success bars, routing heatmap, rollout GIFs, a grounding picture),
   print the table and, last, one JSON line.
Everything is measured in this run; nothing is downloaded. `demo.resume=true` picks a crashed or interrupted run up
where it stopped (same `out`, same settings): finished datasets and stages are kept, a stage continues from its last
checkpoint (every `checkpoint_every` steps), the evaluation runs again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


EVAL_SEED = 1000  # held-out episodes use env seeds 1000+ (collection starts at 0; `vla bench peers` uses the same)
SETTINGS_FILE = "demo_settings.json"  # the run's settings, which `demo.resume` must find unchanged


def _quiet_libraries() -> None:
    """torchcodec cannot find FFmpeg here and prints pages of tracebacks before lerobot falls back to pyav."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    for name in ("torchcodec", "lerobot", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


class _Clock:
    """Wall seconds per phase of the run, in order (`lap(name)` closes the phase that ends now)."""

    def __init__(self) -> None:
        self.start = self._last = time.time()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.time()
        self.seconds[phase] = round(now - self._last, 1)
        self._last = now


def _settings(cfg) -> dict[str, Any]:
    from vla.config import with_settings

    quick = bool(cfg.demo.quick)
    if quick:  # quick_overrides merged in by the training API's rules (nested sections merge)
        overrides = OmegaConf.to_container(cfg.quick_overrides, resolve=True)
        episodes = overrides.pop("episodes", None)
        cfg = with_settings(cfg, overrides)
    c = OmegaConf.to_container(cfg, resolve=True)
    c["from_scratch"] = bool(c["demo"].get("from_scratch", False))
    c["resume"] = bool(c["demo"].get("resume", False))
    if quick:
        if episodes is not None:  # the same robots, fewer demonstrations each
            c["robots"] = [{**robot, "episodes": int(episodes)} for robot in c["robots"]]
        c["out"] = c["out"].rstrip("/") + "_quick" if c["out"] == "outputs/demo" else c["out"]
    c.pop("quick_overrides")
    c["quick"] = quick
    return c


def _comparable(c: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (everything but `resume` itself)."""
    return {k: v for k, v in c.items() if k != "resume"} | {"demo": {k: v for k, v in c["demo"].items() if k != "resume"}}


def prepare_out(c: dict[str, Any]) -> Path:
    """`<out>` emptied for a new run, or, with `demo.resume`, kept when it holds a run of the same settings."""
    out = Path(c["out"])
    settings = json.loads(json.dumps(_comparable(c)))
    if c["resume"] and out.exists():
        path = out / SETTINGS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{out}: no {SETTINGS_FILE}, so not a vla demo run to resume; give another out= "
                                    f"or leave demo.resume off (which replaces it)")
        earlier = json.loads(path.read_text())
        changed = sorted(k for k in settings.keys() | earlier.keys() if settings.get(k) != earlier.get(k))
        if changed:
            raise ValueError(f"{out} was run with other settings ({', '.join(changed)}); demo.resume continues a run "
                             f"only with the settings it started with")
        _say(f"resuming the run in {out}: finished datasets and stages are kept, stages continue from their last "
             f"checkpoint, the evaluation runs again")
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
    return out


def _collect_one(c: dict[str, Any], robot: dict[str, Any], root: Path):
    _quiet_libraries()
    import envs  # noqa: F401  (registers the built-in envs in a spawned worker)
    from envs.collect import collect_dataset

    return collect_dataset(robot["env"], root, int(robot["episodes"]), noise=float(c["noise"]), seed=int(c["seed"]),
                           image_size=int(c["image_size"]), overwrite=True, progress=False,
                           env_kwargs={**(robot.get("env_kwargs") or {}), **(robot.get("collect_env_kwargs") or {})},
                           label=c["label"])


def collect(c: dict[str, Any], out: Path) -> dict[str, str]:
    """One process per robot (collection is single-threaded Python; lerobot's per-episode writing dominates it)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from envs.collect import read_collection_record

    roots = {robot["name"]: out / "data" / robot["name"] for robot in c["robots"]}
    todo = []
    for robot in c["robots"]:
        record = read_collection_record(roots[robot["name"]]) if c.get("resume") else None
        if record and len(record["episode_seeds"]) == int(robot["episodes"]):  # written last: the dataset is whole
            _say(f"kept the {robot['episodes']} episodes of {robot['name']} collected earlier ({roots[robot['name']]})")
        else:
            todo.append(robot)
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_collect_one, c, robot, roots[robot["name"]]) for robot in todo]
        for job in jobs:
            result = job.result()
            _say(f"collected {result.episodes} episodes ({result.frames} frames) of {result.embodiment} in {result.seconds:.1f} s")
    return {name: str(root) for name, root in roots.items()}


def scene_language(c: dict[str, Any], out: Path) -> dict[str, Path]:
    """The vla stage's scene conversations ("sft": co-training) and the held-out scenes ("eval")."""
    from envs.scene_language import generate_scene_language

    envs_used = [r["env"] for r in c["robots"]]
    paths = {"sft": generate_scene_language(out / "lang" / "sft", "sft", int(c["language"]["sft"]),
                                            seed=int(c["seed"]) + 30_000, env_ids=envs_used,
                                            image_size=int(c["image_size"]))}
    # held-out scenes: seeds far from every training scene
    paths["eval"] = generate_scene_language(out / "lang" / "eval", "sft", int(c["language"]["eval"]), seed=900_000,
                                            env_ids=envs_used, image_size=int(c["image_size"]))
    return paths


def train_stage(c: dict[str, Any], out: Path, stage: str, init_from: str | None, stage_settings: dict[str, Any],
                run_name: str | None = None, steps: int | None = None, **settings: Any) -> dict[str, Any]:
    """One stage with the demo's settings, in `<out>/train/<run_name or stage>` (`steps`: default the config's).
    `stage_settings` go under `stage` (its data, options), `settings` at the top (e.g. tokenizer). With `c["resume"]`
    a stage that finished in an earlier run is kept (its summary.json) and one that stopped continues from its last
    checkpoint."""
    from vla.train import run, stage_config

    steps = int(c["steps"][stage] if steps is None else steps)
    run_dir = out / "train" / (run_name or stage)
    if c.get("resume") and (done := finished_stage(run_dir, steps)) is not None:
        _say(f"stage {run_name or stage}: finished in the run resumed ({steps} steps), kept")
        return done
    config = {
        "out": run_dir, "seed": c["seed"], "micro_batch": c["micro_batch"], "resume": bool(c.get("resume")),
        "model": {"language": c["model"], **({"vision": c["vision"]} if c.get("vision") else {}),
                  **({"center_image_tokens": c["center_image_tokens"]} if c.get("center_image_tokens") is not None else {})},
        "checkpoint": {"every": int(c.get("checkpoint_every") or 0), "keep_last": 1},
        "log": {"progress": True, "tensorboard": False},
        "stage": {"steps": steps, "optim": {"lr": c["lr"][stage]},
                  "schedule": {"warmup_steps": max(1, steps // 10)},
                  # the recipe's 0.1x vision-tower learning rate is for a pretrained tower: every stage after the one
                  # that makes it (stage vision trains a random tower at the whole lr)
                  "lr_mult": {} if stage == "vision" else c["vision_lr_mult"], **stage_settings},
        **({"init_from": init_from} if init_from else {}), **settings,
    }
    summary = run(stage_config(stage, config))
    loss = summary["final_loss"]  # None when a resumed stage had saved its last step before it stopped
    _say(f"stage {run_name or stage}: {summary['steps']} steps, final loss {'n/a' if loss is None else f'{loss:.3f}'}")
    return summary


def finished_stage(run_dir: Path, steps: int) -> dict[str, Any] | None:
    """The summary of a stage run that reached `steps` with its checkpoint in place, else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("steps") != steps or not summary.get("checkpoint") or not Path(summary["checkpoint"]).is_dir():
        return None
    return summary | {"losses": {int(k): v for k, v in summary.get("losses", {}).items()}}


def train_vla(c: dict[str, Any], out: Path, init: str, roots: dict[str, str], lang: dict[str, Path],
              run_name: str = "vla", vqa_ratio: float | None = None, steps: int | None = None) -> dict[str, Any]:
    """The vla stage on the robot mixture (each robot at its configured weight) co-trained with the sft scene
    conversations at `vqa_ratio` (default the config's; 0 = no co-training), in `<out>/train/<run_name>`."""
    weights = {r["name"]: float(r.get("weight", 1.0)) for r in c["robots"]}  # sampling weight in the vla mixture
    data = {"datasets": [{"root": root, "weight": weights[name]} for name, root in roots.items()],
            "chunk_len": c["chunk_len"], "image_size": c["image_size"], "vqa_path": lang["sft"],
            "vqa_ratio": c["vqa_ratio"] if vqa_ratio is None else vqa_ratio, "cache_frames": bool(c["cache_frames"])}
    return train_stage(c, out, "vla", init, {"data": data, "options": {"policy": c["policy"]},
                                             "frozen": list(c.get("vla_frozen") or [])},
                       run_name=run_name, steps=steps)


def starting_checkpoint(c: dict[str, Any], out: Path, clock: _Clock | None = None) -> tuple[str, dict[str, Path], set]:
    """(the DeepSeek-VL2 folder the vla stage starts from, the run folders of the stages that made it in this run,
    the (env, seed) scenes it was trained on). The shipped one (`start`) is checked against its made_by.json; with
    `demo.from_scratch` it is first rebuilt under `<out>/mini` into `<out>/dsvl2-mini` (vla/commands/mini.py)."""
    from vla.commands import mini

    stage_dirs: dict[str, Path] = {}
    if c["from_scratch"]:
        folder = mini.build(c, out / "mini", say=_say)
        stage_dirs = {stage: out / "mini" / "train" / stage for stage in ("vision", "align", "pretrain", "sft")}
        if clock is not None:
            clock.lap("mini checkpoint, from scratch")
    else:
        folder = mini.resolve(c["start"])
    made_by = mini.verify(folder)
    _say(f"starting from {folder} (made at {made_by['commit'][:12]}; held-out scene VQA "
         f"{made_by['held_out']['vqa_accuracy']:.2f}, grounding {made_by['held_out']['grounding_acc']:.2f})")
    return str(folder), stage_dirs, mini.trained_scene_keys(made_by)


def train_policy(c: dict[str, Any], out: Path, clock: _Clock) -> dict[str, Any]:
    """Steps 1-2: the robot datasets, the starting checkpoint (shipped, or rebuilt with `demo.from_scratch`), the
    scene-language data, then the vla stage on the robot mixture co-trained with scene VQA; the policy is copied to
    `<out>/policy`. Each phase is a lap of `clock` (the vla stage's: "stage vla"). `vla bench peers` trains "ours"
    through this function. Returns {"roots", "lang", "stage_dirs", "start", "start_scenes", "policy_dir",
    "vla_summary"} (start: the checkpoint the vla stage starts from; start_scenes: the scenes it was trained on)."""
    roots = collect(c, out)
    clock.lap("collect demonstrations")
    start, stage_dirs, start_scenes = starting_checkpoint(c, out, clock)
    lang = scene_language(c, out)
    clock.lap("scene-language data")
    vla_summary = train_vla(c, out, start, roots, lang)
    stage_dirs["vla"] = out / "train" / "vla"
    policy_dir = str(out / "policy")
    shutil.rmtree(policy_dir, ignore_errors=True)  # a resumed run's earlier copy
    shutil.copytree(vla_summary["checkpoint"], policy_dir)
    clock.lap("stage vla")
    return {"roots": roots, "lang": lang, "stage_dirs": stage_dirs, "start": start, "start_scenes": start_scenes,
            "policy_dir": policy_dir, "vla_summary": vla_summary}


def listens_test_possible(env_kwargs: dict[str, Any]) -> bool:
    """The wrong-instruction baseline needs another object to name: scenes of 2+ objects (the envs' default)."""
    return int(list(env_kwargs.get("num_objects") or [2])[0]) >= 2


def evaluate_policies(c: dict[str, Any], out: Path, policy_dir: str, roots: dict[str, str]) -> dict[str, Any]:
    import envs  # noqa: F401
    from envs.rollout import evaluate
    from vla.commands import register_env_policies

    register_env_policies()  # policy=checkpoint:DIR

    results: dict[str, Any] = {}
    for robot in c["robots"]:
        env_id, name = robot["env"], robot["name"]
        kwargs = dict(robot.get("env_kwargs") or {})
        runs = [("policy", f"checkpoint:{policy_dir}", {}, kwargs), ("random", "random", {}, kwargs),
                ("no-vision prior", "prior", {"dataset": roots[name]}, kwargs)]
        if listens_test_possible(kwargs):  # the same policy told to go to another object of the same scene
            runs.append(("wrong instruction", f"checkpoint:{policy_dir}", {}, kwargs | {"instruction": "other"}))
        for label, spec, options, env_kwargs in runs:
            summary = evaluate(spec, [env_id], episodes=int(c["eval_episodes"]), batch_size=int(c["eval_batch"]),
                               out=out / "eval" / f"{name}-{label.split()[0]}", videos=2 if label == "policy" else 0,
                               seed=EVAL_SEED, image_size=int(c["image_size"]), policy_options=options, progress=False,
                               env_kwargs={env_id: env_kwargs},
                               train_datasets=list(roots.values()))  # refuses seeds the demos were collected from
            embodiment = next(iter(summary["per_embodiment"]))
            results.setdefault(embodiment, {})[label] = summary["overall"]["success_rate"]
            results[embodiment].setdefault("videos", []).extend(summary["videos"])
            _say(f"{env_id} ({embodiment}) {label}: success {summary['overall']['success_rate']:.2f}")
    return results


def evaluate_language(c: dict[str, Any], out: Path, policy_dir: str, lang: dict[str, Path],
                      roots: dict[str, str] | None = None, trained_scenes: set = frozenset()) -> dict[str, Any]:
    """Scene VQA and grounding of `policy_dir` on the held-out scenes `lang["eval"]`, refused when one of them is a
    scene of `lang`'s training parts, a robot dataset's episodes or `trained_scenes` (the starting checkpoint's)."""
    from backbone.grounding import draw_grounding, locate_prompt
    from envs.collect import read_collection_record
    from envs.scene_language import blind_baseline, check_held_out, load_conversations, scene_keys
    from vla.policy.checkpoint import load_vl2_for_chat
    from vla.commands.vqa import answer, evaluate_scene_vqa

    records = load_conversations(lang["eval"])
    # held out for real: no eval scene is one a training stage or a robot dataset showed (refused otherwise)
    trained = set(trained_scenes) | scene_keys(load_conversations(lang["sft"], check_images=False))
    for root in (roots or {}).values():
        record = read_collection_record(root) or {}
        trained |= {(record["env_id"], int(s)) for s in record.get("episode_seeds", [])}
    check_held_out(records, trained)
    model, processor = load_vl2_for_chat(policy_dir)
    result = evaluate_scene_vqa(model, processor, records, progress=False)
    # the language side's "no vision" baseline: the most common training answer per question, the mean training box
    result["blind"] = blind_baseline(load_conversations(lang["sft"]), records)
    # one grounding picture: the model's box (and the question) on a held-out scene
    record = records[0]
    target = record.meta["objects"][0]["name"]
    text = answer(model, processor, locate_prompt(f"the {target}"), [record.images[0]], max_new_tokens=40)
    picture = out / "grounding.png"
    from PIL import Image

    from envs.scene_language import grounding_answer, to_det

    width, height = record.meta["image_size"]
    truth = grounding_answer("truth", to_det(record.meta["objects"][0]["bbox"], width, height))
    image = Image.open(record.images[0]).convert("RGB").resize((256, 256), Image.NEAREST)
    draw_grounding(image, text + truth, picture)  # the model's box(es) and the true box, labelled "truth"
    result["grounding_example"] = {"question": f"Locate the {target}", "answer": text, "image": str(picture)}
    _say(f"scene VQA accuracy {result['vqa_accuracy']:.2f} ({result['n_vqa']} questions; blind "
         f"{result['blind']['vqa_accuracy']:.2f}), grounding {result['grounding_acc']:.2f} ({result['n_grounding']} "
         f"boxes; blind {result['blind']['grounding_acc']:.2f})")
    return result


# routing is measured on frames of the vla stage's own training datasets, not on held-out rollouts
ROUTING_FRAMES = "training frames (the vla stage's robot datasets), not held-out scenes"
GROUNDING_SCORING = ("Grounding is scored on the one box the answer gives: an answer is right only if it gives exactly "
                     "one box and that box has IoU >= 0.5 with the true box (extra boxes make it wrong).")


def routing(c: dict[str, Any], out: Path, policy_dir: str, roots: dict[str, str]) -> dict[str, Any]:
    import torch

    from envs.mixture import MixtureDataset, make_mixture_loader
    from vla.policy import VLAPolicy
    from vla.policy.routing import collect_policy_routing, plot_routing_heatmap, write_routing_json

    policy = VLAPolicy.load(policy_dir)
    mixture = MixtureDataset(list(roots.values()), action_horizon=int(c["chunk_len"]), image_size=int(c["image_size"]))
    loader = make_mixture_loader(mixture, batch_size=8, seed=1, num_samples=8 * (2 if c["quick"] else 8))
    with torch.no_grad():
        stats = collect_policy_routing(policy, loader)
    report = write_routing_json(stats, out / "routing.json", measured_on=ROUTING_FRAMES)
    plot_routing_heatmap(stats, out / "routing.png",
                         title="expert share per token group (action tokens per robot; training frames)")
    return report


def plot_results(out: Path, success: dict[str, Any], stage_dirs: dict[str, Path]) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stage_dirs), figsize=(4 * len(stage_dirs), 3), squeeze=False)
    for ax, (stage, folder) in zip(axes[0], stage_dirs.items()):
        rows = list(csv.DictReader(open(folder / "metrics.csv")))
        ax.plot([int(r["step"]) for r in rows], [float(r["train/loss"]) for r in rows])
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)

    labels = ["policy", "no-vision prior", "random"] + \
        (["wrong instruction"] if all("wrong instruction" in s for s in success.values()) else [])
    fig, ax = plt.subplots(figsize=(6, 3))
    width = 0.8 / len(labels)
    names = sorted(success)
    for i, label in enumerate(labels):
        ax.bar([j + i * width for j in range(len(names))], [success[n][label] for n in names], width, label=label)
    ax.set_xticks([j + width for j in range(len(names))], names)
    ax.set_ylabel("success rate (held-out seeds)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "success.png", dpi=100)
    plt.close(fig)


def write_report(out: Path, c: dict[str, Any], success: dict[str, Any], language: dict[str, Any], route: dict[str, Any],
                 summary: dict[str, Any], start_dir: str) -> str:
    rows = ["| robot | policy success | no-vision prior | random | wrong instruction |", "|---|---|---|---|---|"]
    for name in sorted(success):
        s = success[name]
        wrong = f"{s['wrong instruction']:.2f}" if "wrong instruction" in s else "n/a (one object per scene)"
        rows.append(f"| {name} | {s['policy']:.2f} | {s['no-vision prior']:.2f} | {s['random']:.2f} | {wrong} |")
    blind, start = language["blind"], language["start"]
    table = "\n".join(rows + [
        "", "| scene language (held-out scenes) | before: the vla stage's start | after: the policy | blind |",
        "|---|---|---|---|",
        f"| VQA accuracy ({language['n_vqa']} questions) | {start['vqa_accuracy']:.2f} | {language['vqa_accuracy']:.2f} | "
        f"{blind['vqa_accuracy']:.2f} |",
        f"| grounding acc, one box with IoU >= 0.5 ({language['n_grounding']} boxes) | {start['grounding_acc']:.2f} | "
        f"{language['grounding_acc']:.2f} | {blind['grounding_acc']:.2f} |",
        f"| wall time of the whole demo | | {summary['wall_s']:.0f} s | |",
        "", "| expert routing, measured on training frames | model |", "|---|---|",
        f"| routing NMI (embodiment vs expert, action tokens of training frames) | {_fmt(route.get('nmi_mean'))} |",
    ])
    per_kind = "\n".join(["| question kind | questions | model | blind |", "|---|---|---|---|"] + [
        f"| {kind} | {n['total']} | {n['accuracy']:.2f} | {blind['by_kind'][kind]['accuracy']:.2f} |"  # same records, same kinds
        for kind, n in language["by_kind"].items()])
    phases = "\n".join(f"| {phase} | {seconds:.0f} |" for phase, seconds in summary["phase_s"].items())
    gifs = "\n".join(f"![{Path(v).stem}]({Path(v).relative_to(out)})" for s in success.values() for v in s.get("videos", [])[:1])
    example = language["grounding_example"]
    report = f"""# DeepSeek-VL2 VLA demo{' (quick smoke run: numbers are not meaningful)' if c['quick'] else ''}

Robots: {', '.join(f"{r['name']} ({r['episodes']} demos of {r['env']}{_kwargs(r)})" for r in c['robots'])}.
Started from `{start_dir}` ({'rebuilt in this run: ' if c['from_scratch'] else 'shipped; '}made by the project's own code,
stages vision -> align -> pretrain -> sft, see its made_by.json), then the vla stage ({c['steps']['vla']} steps).

{table}

{GROUNDING_SCORING} Routing NMI is measured on {ROUTING_FRAMES}.

## Loss curves
![loss curves](loss_curves.png)

## Success per robot (held-out seeds)
![success](success.png)

## Expert routing per robot (training frames)
![routing](routing.png)

Measured on {ROUTING_FRAMES}. Per-layer shares and the specialization scores are in `routing.json`.

## Rollouts
{gifs}

## Scene language per question kind (held-out scenes)
"blind" answers every question with the most common training answer to it, and every box with the mean training box
of the object: what the text alone gives.

{per_kind}

## Where the time went
| phase | wall s |
|---|---|
{phases}

## Grounding
Question: "{example['question']}" -> answer `{example['answer']}`

![grounding](grounding.png)

## Example answers
""" + "\n".join(f"- {'OK ' if e['correct'] else 'XX '} {e['question'].strip()} -> `{e['answer']}` (expected `{e['expected']}`)"
                for e in language["examples"]) + "\n"
    (out / "report.md").write_text(report)
    return table


def _kwargs(robot: dict[str, Any]) -> str:
    kwargs = robot.get("env_kwargs") or {}
    return "".join(f", {k}={v}" for k, v in kwargs.items())


def _ratio(after: float, before: float) -> float | None:
    """What the policy checkpoint keeps of the starting checkpoint's accuracy (None when it started at 0)."""
    return round(after / before, 4) if before > 0 else None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(cfg) -> int:
    _quiet_libraries()
    clock = _Clock()
    c = _settings(cfg)
    out = prepare_out(c)
    _say(f"writing to {out}{' (quick)' if c['quick'] else ''}")
    trained = train_policy(c, out, clock)
    roots, lang, stage_dirs, policy_dir = trained["roots"], trained["lang"], trained["stage_dirs"], trained["policy_dir"]

    success = evaluate_policies(c, out, policy_dir, roots)
    clock.lap("policy + baseline rollouts")
    language = evaluate_language(c, out, policy_dir, lang, roots, trained["start_scenes"])
    (out / "start").mkdir(exist_ok=True)  # the checkpoint the vla stage started from, on the same held-out scenes
    language["start"] = evaluate_language(c, out / "start", trained["start"], lang, roots, trained["start_scenes"])
    clock.lap("scene VQA + grounding eval")
    route = routing(c, out, policy_dir, roots)
    plot_results(out, success, stage_dirs)
    clock.lap("routing + plots")
    summary = {"wall_s": time.time() - clock.start, "phase_s": clock.seconds}
    table = write_report(out, c, success, language, route, summary, trained["start"])
    import resource

    result = {
        "success": {n: s["policy"] for n, s in success.items()},
        "baseline_success": {n: {"random": s["random"], "no_vision": s["no-vision prior"],
                                 "wrong_instruction": s.get("wrong instruction")} for n, s in success.items()},
        "vqa_accuracy": round(language["vqa_accuracy"], 4),
        "grounding_acc": round(language["grounding_acc"], 4),
        "language_baseline": {"blind": {"vqa_accuracy": round(language["blind"]["vqa_accuracy"], 4),
                                        "grounding_acc": round(language["blind"]["grounding_acc"], 4)}},
        "vqa_by_kind": {kind: round(n["accuracy"], 4) for kind, n in language["by_kind"].items() if kind != "grounding"},
        "start_vqa_accuracy": round(language["start"]["vqa_accuracy"], 4),
        "start_grounding_acc": round(language["start"]["grounding_acc"], 4),
        "vqa_retention": _ratio(language["vqa_accuracy"], language["start"]["vqa_accuracy"]),
        "grounding_retention": _ratio(language["grounding_acc"], language["start"]["grounding_acc"]),
        "routing_nmi": route.get("nmi_mean"),
        "routing_measured_on": "training frames",
        "wall_s": round(time.time() - clock.start, 1),
        "phase_s": clock.seconds,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "report": str(out / "report.md"),
        "quick": c["quick"],
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(table)
    print(json.dumps(result))
    return 0
