"""`vla bench peers [--quick]`: ours against LeRobot's own ACT and Diffusion Policy, same data, same minutes, same seeds.

For each robot of the demo (the point robot and the 3-link arm, one-object scenes: a policy without language is a fair
peer there), on the same LeRobotDatasets:

- **ours**: the demo's pipeline as `vla demo` runs it (`vla.commands.demo.train_policy`, `configs/demo.yaml`): the datasets,
  then the vla stage from the shipped mini DeepSeek-VL2 checkpoint; one model for both robots (which also answers
  scene questions). Its training budget is the measured wall-clock of the vla stage (the demo's "stage vla" lap: the
  stage from start to its saved checkpoint); what made the starting checkpoint is not counted (as a pretrained
  backbone is not).
- **ACT** and **Diffusion Policy**, each trained with the real `lerobot-train` command on one robot's dataset, in two
  configurations (`configs/bench_peers.yaml`, where each changed field says why): LeRobot's defaults (only
  `pretrained_backbone_weights=null`, since nothing may be downloaded; the image size comes from the dataset's
  features) and one sized to this CPU budget.

Equal minutes: each peer gets the vla stage's seconds divided by the number of robots (ours trains one model for
all of them). lerobot-train stops at `--steps`, so the steps are chosen from a probe: the same command with
`probe_steps` steps (log windows of half of them; saving included) gives the seconds per step (the last log window's
update + data time) and the fixed cost (the probe's wall time minus its steps: start-up and the final save); the run
then gets `floor((budget - fixed) / seconds_per_step)` steps (at least `min_steps`). The probe is not counted in the
budget. Each run's own wall-clock (process start to exit, as for ours) is measured and reported as `train_s`, so
the table shows how close to equal the budgets came; a run past `timeout_factor` x its budget is stopped and
reported as failed. Every process uses this machine's default threads and device (torch's and lerobot's auto
choice), as the demo does; `threads=N` sets both (OMP_NUM_THREADS for lerobot-train); `--quick` uses 1 thread
unless told otherwise (on a busy 2-core machine OpenMP stalls at 2 threads made its 4-step vla stage 18x slower).

Every contender is rolled out through `envs.rollout.evaluate` (peers as `policy=lerobot:DIR`, ours as
`checkpoint:DIR`) on the demo's held-out seeds (`vla.commands.demo.EVAL_SEED`+, `eval_episodes` per robot), with the demo's
training datasets as the held-out guard; the random and no-vision (action prior) baselines run on the same seeds.
No download: `HF_HUB_OFFLINE=1`, and lerobot-train runs with an empty TORCH_HOME that must still be empty after it
(a downloaded backbone fails the bench).

Prints the table (success per robot per contender, steps, seconds per step, training seconds, parameters), then
returns the JSON summary: `success.<robot>.<contender>`, `steps.<contender>`, `train_s.<contender>`,
`s_per_step.<contender>`, `params.<contender>` (peers: one value per robot), `budget_s`, `failed`.
`--quick` (CI): the demo's quick settings, every contender shrunk (`quick` in configs/bench_peers.yaml), 2 steps each;
its numbers mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks._util import print_table, setup

CONFIG = "bench_peers"
STEP_LOG = re.compile(r"step:(\d+)\s.*?updt_s:([\d.]+)\s+data_s:([\d.]+)")
PARAMS_LOG = re.compile(r"num_total_params=(\d+)")
BASELINES = (("random", "random"), ("no_vision", "prior"))  # (label, policy spec): the demo's baselines
PROBE_GRACE_S = 600.0  # seconds a probe (or an unprobed quick run) may take beyond timeout_factor x its budget


@dataclass(frozen=True)
class Contender:
    """One lerobot-train configuration: `--policy.type=<type>`, `--policy.<field>=<value>` for `fields`,
    `--<key>=<value>` for `train` (batch_size, num_workers, ...); `eval_config` changes inference-time fields of
    the checkpoint's config for the rollouts (`policy=lerobot:DIR` with `policy_options={config: ...}`)."""

    name: str
    label: str
    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    eval_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class PeerRun:
    contender: str
    robot: str
    budget_s: float
    steps: int = 0
    train_s: float = 0.0
    s_per_step: float | None = None
    fixed_s: float | None = None
    params: int | None = None
    checkpoint: str | None = None
    error: str | None = None


def settings(cfg) -> dict[str, Any]:
    """configs/bench_peers.yaml merged with the command line's `peers.*`; `--quick` applies its `quick` section."""
    from omegaconf import OmegaConf

    from vla.config import CONFIG_DIR

    base = OmegaConf.load(CONFIG_DIR / f"{CONFIG}.yaml")
    s = OmegaConf.to_container(OmegaConf.merge(base, cfg.get("peers") or {}), resolve=True)
    quick = s.pop("quick")
    s["quick"] = bool(cfg.get("quick"))
    if s["quick"]:
        for key in ("probe_steps", "max_steps", "timeout_factor", "videos", "threads"):
            s[key] = quick[key]
        for contender in s["contenders"].values():
            contender["fields"] = {**contender["fields"], **quick["fields"].get(contender["type"], {})}
            contender["train"] = {**contender["train"], **quick["train"]}
            contender["eval_config"] = {}
        if s["out"] == base["out"]:  # the default folder: a quick run does not replace a full one's results
            s["out"] = s["out"].rstrip("/") + "_quick"
    s["contenders"] = [Contender(name, **spec) for name, spec in s["contenders"].items()]
    return s


def lerobot_train_command(contender: Contender, root: str, out_dir: Path, steps: int, log_freq: int) -> list[str]:
    """The lerobot-train command line of one contender on one dataset (the real command, nothing re-implemented)."""
    from vla.policy.lerobot_checkpoint import cli_value

    exe = shutil.which("lerobot-train", path=str(Path(sys.executable).parent)) or "lerobot-train"
    root, out_dir = Path(root).resolve(), Path(out_dir).resolve()
    command = [exe, f"--dataset.repo_id=local/{root.name}", f"--dataset.root={root}",
               f"--policy.type={contender.type}", "--policy.push_to_hub=false", "--wandb.enable=false",
               f"--output_dir={out_dir}", f"--steps={steps}", f"--save_freq={steps}", f"--log_freq={log_freq}",
               "--seed=0"]
    command += [f"--{key}={cli_value(value)}" for key, value in contender.train.items()]
    command += [f"--policy.{key}={cli_value(value)}" for key, value in contender.fields.items()]
    return command


def parse_train_log(text: str) -> dict[str, Any]:
    """Seconds per step (update + data time of the last log window) and the parameter count lerobot-train logged."""
    windows = [(int(m.group(1)), float(m.group(2)) + float(m.group(3))) for m in STEP_LOG.finditer(text)]
    params = PARAMS_LOG.search(text)
    return {"s_per_step": round(windows[-1][1], 4) if windows else None, "params": int(params.group(1)) if params else None}


def steps_for_budget(budget_s: float, fixed_s: float, s_per_step: float, min_steps: int, max_steps: int | None) -> int:
    """How many steps `budget_s` pays for after the fixed cost (start-up, final save)."""
    steps = max(int(min_steps), math.floor((budget_s - fixed_s) / max(s_per_step, 1e-9)))
    return min(steps, int(max_steps)) if max_steps else steps


def _subprocess_env(torch_home: Path, threads: int) -> dict[str, str]:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TORCH_HOME": str(torch_home)}
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run_lerobot_train(command: list[str], log: Path, env: dict[str, str], timeout_s: float) -> tuple[float, str, str | None]:
    """(wall seconds, log text, error or None) of one lerobot-train process."""
    t0 = time.perf_counter()
    with open(log, "w") as handle:
        try:
            result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
            error = None if result.returncode == 0 else f"lerobot-train exited with {result.returncode} (see {log})"
        except subprocess.TimeoutExpired:
            error = f"lerobot-train ran past {timeout_s:.0f} s and was stopped (see {log})"
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    torch_home = Path(env["TORCH_HOME"])
    downloaded = [str(p) for p in torch_home.rglob("*") if p.is_file()]
    if downloaded:
        raise RuntimeError(f"lerobot-train downloaded {downloaded[0]} (nothing may be downloaded): {' '.join(command)}")
    return wall, text, error


def train_peer(contender: Contender, robot: str, root: str, budget_s: float, s: dict[str, Any], out: Path,
               threads: int) -> PeerRun:
    """Probe, pick the steps the budget pays for, train; the checkpoint is `<out>/<contender>/<robot>/run`."""
    run = PeerRun(contender.name, robot, round(budget_s, 1))
    folder = out / "peers" / contender.name / robot
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    env = _subprocess_env(folder / "torch_home", threads)
    (folder / "torch_home").mkdir()
    probe_steps = int(s["probe_steps"])
    if probe_steps > 0:
        probe_cmd = lerobot_train_command(contender, root, folder / "probe", probe_steps, max(1, probe_steps // 2))
        limit = max(budget_s, 1.0) * float(s["timeout_factor"]) + PROBE_GRACE_S
        probe_wall, text, error = _run_lerobot_train(probe_cmd, folder / "probe.log", env, limit)
        shutil.rmtree(folder / "probe", ignore_errors=True)
        parsed = parse_train_log(text)
        if error or parsed["s_per_step"] is None:
            run.error = error or f"no step timing in {folder / 'probe.log'}"
            return run
        run.s_per_step = parsed["s_per_step"]
        run.fixed_s = round(max(0.0, probe_wall - probe_steps * run.s_per_step), 1)
        run.steps = steps_for_budget(budget_s, run.fixed_s, run.s_per_step, int(s["min_steps"]), s["max_steps"])
        limit = max(budget_s, run.fixed_s + run.steps * run.s_per_step) * float(s["timeout_factor"]) + run.fixed_s
    else:  # no probe (--quick): a fixed number of steps
        run.steps = int(s["max_steps"] or s["min_steps"])
        limit = max(budget_s, 1.0) * float(s["timeout_factor"]) + PROBE_GRACE_S
    command = lerobot_train_command(contender, root, folder / "run", run.steps, max(1, min(200, run.steps // 10)))
    (folder / "command.txt").write_text(" ".join(command) + "\n")
    wall, text, error = _run_lerobot_train(command, folder / "train.log", env, limit)
    run.train_s = round(wall, 1)
    parsed = parse_train_log(text)
    run.params = parsed["params"]
    if parsed["s_per_step"] is not None:
        run.s_per_step = parsed["s_per_step"]
    checkpoint = folder / "run" / "checkpoints" / "last"
    if error or not (checkpoint / "pretrained_model" / "config.json").is_file():
        run.error = error or f"no checkpoint in {checkpoint}"
        return run
    done = json.loads((checkpoint / "training_state" / "training_step.json").read_text())["step"]
    run.steps = int(done)
    if not s["keep_training_state"]:
        shutil.rmtree(checkpoint.resolve() / "training_state", ignore_errors=True)
    run.checkpoint = str(checkpoint / "pretrained_model")
    return run


def ours_seconds_per_step(train_dir: Path, samples_per_step: float) -> float | None:
    """The vla stage's steady seconds per step: the median over its metrics.csv log windows (samples per step /
    samples per second), as the peers' come from lerobot-train's log windows."""
    import csv
    import statistics

    path = Path(train_dir) / "metrics.csv"
    if not path.is_file():
        return None
    rates = [float(r["train/samples_per_s"]) for r in csv.DictReader(open(path)) if r.get("train/samples_per_s")]
    return round(samples_per_step / statistics.median(rates), 4) if rates else None


def _machine() -> str:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    return f"{os.cpu_count()} CPUs ({model}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def run(cfg) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import envs  # noqa: F401  (registers the gym envs)
    from envs.rollout import evaluate
    from vla.commands import demo, register_env_policies
    from vla.config import load_config
    from vla.policy import VLAPolicy

    register_env_policies()  # policy=checkpoint:DIR, lerobot:DIR

    setup(cfg)
    s = settings(cfg)
    threads = int(cfg.get("threads", 0) or 0) or int(s["threads"] or 0)
    if threads > 0:
        torch.set_num_threads(threads)  # ours and the rollouts here; OMP_NUM_THREADS for lerobot-train
    demo._quiet_libraries()
    c = demo._settings(load_config("demo", [*s["demo_overrides"], f"demo.quick={str(s['quick']).lower()}"]))
    out = Path(s["out"])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_start = time.perf_counter()

    # ours: the demo's pipeline; the budget is its vla stage's wall-clock
    clock = demo._Clock()
    trained = demo.train_policy(c, out / "ours", clock)
    roots, policy_dir = trained["roots"], trained["policy_dir"]
    budget = float(clock.seconds["stage vla"])
    vla_summary = trained["vla_summary"]
    ours_steps = int(vla_summary["steps"])
    ours_s_per_step = ours_seconds_per_step(trained["stage_dirs"]["vla"], vla_summary["samples"] / max(ours_steps, 1))
    robots = [(robot["name"], robot["env"], dict(robot.get("env_kwargs") or {})) for robot in c["robots"]]
    per_robot = budget / len(robots)
    print(f"[peers] ours: vla stage {ours_steps} steps in {budget:.1f} s; each per-robot peer gets {per_robot:.1f} s",
          flush=True)

    def rollouts(label: str, spec: str, robot: str, env_id: str, env_kwargs: dict, options: dict) -> float:
        summary = evaluate(spec, [env_id], episodes=int(c["eval_episodes"]), batch_size=int(c["eval_batch"]),
                           out=out / "eval" / f"{label}-{robot}", videos=int(s["videos"]), seed=demo.EVAL_SEED,
                           image_size=int(c["image_size"]), policy_options=options, progress=False,
                           env_kwargs={env_id: env_kwargs}, train_datasets=list(roots.values()))
        return summary["overall"]["success_rate"]

    success: dict[str, dict[str, float | None]] = {name: {} for name, _, _ in robots}
    for name, env_id, env_kwargs in robots:
        success[name]["ours"] = rollouts("ours", f"checkpoint:{policy_dir}", name, env_id, env_kwargs, {})
        for label, spec in BASELINES:
            success[name][label] = rollouts(label, spec, name, env_id, env_kwargs, {"dataset": roots[name]})
    ours_params = sum(p.numel() for p in VLAPolicy.load(policy_dir).parameters())

    runs: list[PeerRun] = []
    for contender in s["contenders"]:
        for name, env_id, env_kwargs in robots:
            what = f"probe, then lerobot-train for {per_robot:.1f} s" if int(s["probe_steps"]) > 0 else \
                f"lerobot-train for {s['max_steps'] or s['min_steps']} steps (no probe)"
            print(f"[peers] {contender.name} on {name}: {what}", flush=True)
            peer = train_peer(contender, name, roots[name], per_robot, s, out, threads)
            runs.append(peer)
            if peer.error is None:
                success[name][contender.name] = rollouts(contender.name, f"lerobot:{peer.checkpoint}", name, env_id,
                                                         env_kwargs, {"config": contender.eval_config})
            else:
                success[name][contender.name] = None
            print(f"[peers] {contender.name} on {name}: {peer.steps} steps, {peer.train_s:.1f} s, success "
                  f"{success[name][contender.name]}{'' if peer.error is None else f' FAILED: {peer.error}'}", flush=True)

    by = {(r.contender, r.robot): r for r in runs}
    names = [n for n, _, _ in robots]
    rows = [["ours (one model, both robots)", *[f"{success[n]['ours']:.2f}" for n in names], str(ours_steps),
             "-" if ours_s_per_step is None else f"{ours_s_per_step:.3f}", f"{budget:.0f}", f"{ours_params / 1e6:.1f}M"]]
    for contender in s["contenders"]:
        peer_runs = [by[(contender.name, n)] for n in names]
        rows.append([contender.label, *[_fmt(success[n][contender.name]) for n in names],
                     " / ".join(str(r.steps) for r in peer_runs),
                     " / ".join("-" if r.s_per_step is None else f"{r.s_per_step:.3f}" for r in peer_runs),
                     " / ".join(f"{r.train_s:.0f}" for r in peer_runs),
                     " / ".join("-" if r.params is None else f"{r.params / 1e6:.1f}M" for r in peer_runs)])
    for label, _ in BASELINES:
        rows.append([f"baseline: {label}", *[f"{success[n][label]:.2f}" for n in names], "-", "-", "-", "-"])
    print(f"\nsuccess on {c['eval_episodes']} held-out episodes per robot (seeds {demo.EVAL_SEED}+); budget: ours' vla "
          f"stage {budget:.0f} s, each per-robot peer {per_robot:.0f} s; peers' columns are {' / '.join(names)}"
          f"{'; QUICK: numbers meaningless' if s['quick'] else ''}")
    print_table(["contender", *[f"{n} success" for n in names], "steps", "s/step", "train s", "params"], rows)
    failed = {f"{r.contender}.{r.robot}": r.error for r in runs if r.error}
    for key, error in failed.items():
        print(f"FAILED {key}: {error}")
    print(f"machine: {_machine()}")

    peers = {contender.name: [by[(contender.name, n)] for n in names] for contender in s["contenders"]}
    return {
        "success": success,
        "steps": {"ours": ours_steps} | {k: {r.robot: r.steps for r in v} for k, v in peers.items()},
        "train_s": {"ours": round(budget, 1)} | {k: {r.robot: r.train_s for r in v} for k, v in peers.items()},
        "s_per_step": {"ours": ours_s_per_step}
        | {k: {r.robot: r.s_per_step for r in v} for k, v in peers.items()},
        "params": {"ours": ours_params} | {k: {r.robot: r.params for r in v} for k, v in peers.items()},
        "budget_s": {"ours": round(budget, 1), "per_robot_peer": round(per_robot, 1)},
        "fixed_s": {k: {r.robot: r.fixed_s for r in v} for k, v in peers.items()},
        "eval": {"episodes_per_robot": int(c["eval_episodes"]), "seed": demo.EVAL_SEED},
        "failed": failed,
        "machine": _machine(),
        "out": str(out),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "quick": s["quick"],
    }


def _fmt(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f}"
