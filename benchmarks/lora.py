"""`vla bench lora`: LoRA against full fine-tuning of the vla stage, same steps, from the same trained checkpoint.

Demo-size model (the demo's language overrides of the test preset, 64-px frames, chunk 8), the demo's two robots
(point robot and 3-link arm, one object per scene) with scripted-expert demonstrations. A base policy is trained
with the vla stage from a random init (`base_steps`), then fine-tuned on the same mixture for `steps` more steps,
once in full and once with LoRA r=16 (`peft.method=lora`: adapters on attention / dense MLP / shared experts /
projector, the action head and the added token rows in full), and once more with LoRA r=16 on the routed experts too
(`peft.experts=true`). Success on held-out seeds (1000+) for the base, the full and the LoRA fine-tunes; the last
lines report each LoRA's success as a share of full fine-tuning's.
`--quick`: a smoke run (tiny data and steps; numbers meaningless).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks._util import print_table, setup

MODEL = "{hidden_size: 128, intermediate_size: 256, moe_intermediate_size: 64, num_hidden_layers: 4, " \
        "num_attention_heads: 4, kv_lora_rank: 32, qk_nope_head_dim: 32, qk_rope_head_dim: 16, v_head_dim: 32}"
ROBOTS = (("vla/PointNav-v0", "nav", 1.0), ("vla/ArmReach-v0", "arm", 2.0))
FULL = {"episodes": 200, "base_steps": 2000, "steps": 800, "micro_batch": 16, "eval_episodes": 200}
RUNS = ("base", "full", "lora", "lora_experts")
QUICK = {"episodes": 4, "base_steps": 3, "steps": 3, "micro_batch": 4, "eval_episodes": 2}


def _train(out: Path, steps: int, lr: float, datasets: str, micro_batch: int, extra: list[str]) -> dict:
    from vla.config import load_config
    from vla.train import run

    return run(load_config("train", [
        "stage=vla", f"out={out}", "seed=0", f"stage.steps={steps}", f"stage.optim.lr={lr}", f"micro_batch={micro_batch}",
        f"model.language={MODEL}", "checkpoint.every=0", "checkpoint.keep_last=1", "log.progress=false",
        "log.tensorboard=false", "log.plot=false", f"stage.schedule.warmup_steps={max(1, steps // 10)}",
        "stage.lr_mult={vision_tower: 1.0}",
        f"stage.data={{datasets: {datasets}, chunk_len: 8, image_size: 64, cache_frames: true}}",
        "stage.options={policy: {n_action_steps: 8}}", *extra]))


def run(cfg) -> dict:
    import envs  # noqa: F401  (registers the gym envs)
    from envs.collect import collect_dataset
    from envs.rollout import evaluate
    from vla.commands import register_env_policies
    from vla.policy.lora import ADAPTER_WEIGHTS

    register_env_policies()  # policy=checkpoint:DIR

    setup(cfg)
    s = QUICK if cfg.get("quick") else FULL
    if int(cfg.get("steps") or 0) > 0:
        s = s | {"steps": int(cfg.steps)}
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vla_bench_lora_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        roots = {}
        for env_id, name, _ in ROBOTS:
            roots[name] = collect_dataset(env_id, tmp / name, s["episodes"], image_size=64, noise=0.1, seed=0,
                                          progress=False, env_kwargs={"num_objects": [1, 1]}).root
        datasets = "[" + ", ".join(f"{{root: '{roots[n]}', weight: {w}}}" for _, n, w in ROBOTS) + "]"
        timings["collect"] = time.perf_counter() - t0
        runs = {}
        t0 = time.perf_counter()
        runs["base"] = _train(tmp / "base", s["base_steps"], 1e-3, datasets, s["micro_batch"], [])
        timings["base"] = time.perf_counter() - t0
        base = runs["base"]["checkpoint"]
        lora = ["peft.method=lora", "peft.r=16"]
        for label, lr, extra in (("full", 3e-4, []), ("lora", 1e-3, lora), ("lora_experts", 1e-3, [*lora, "peft.experts=true"])):
            t0 = time.perf_counter()
            runs[label] = _train(tmp / label, s["steps"], lr, datasets, s["micro_batch"], [f"init_from={base}", *extra])
            timings[label] = time.perf_counter() - t0
        adapter_mb = (Path(runs["lora"]["checkpoint"]) / ADAPTER_WEIGHTS).stat().st_size / 2**20
        experts_mb = (Path(runs["lora_experts"]["checkpoint"]) / ADAPTER_WEIGHTS).stat().st_size / 2**20
        full_mb = sum(p.stat().st_size for p in Path(runs["full"]["checkpoint"]).rglob("*.safetensors")) / 2**20
        success: dict[str, dict[str, float]] = {}
        t0 = time.perf_counter()
        for label in RUNS:
            for env_id, name, _ in ROBOTS:
                summary = evaluate(f"checkpoint:{runs[label]['checkpoint']}", [env_id], episodes=s["eval_episodes"],
                                   batch_size=10 if s["eval_episodes"] >= 10 else s["eval_episodes"], seed=1000,
                                   image_size=64, progress=False, videos=0,
                                   env_kwargs={env_id: {"num_objects": [1, 1]}})
                success.setdefault(label, {})[name] = summary["overall"]["success_rate"]
        timings["eval"] = time.perf_counter() - t0
    mean = {label: sum(v.values()) / len(v) for label, v in success.items()}
    ratio = {label: mean[label] / mean["full"] if mean["full"] > 0 else None for label in ("lora", "lora_experts")}
    print(f"vla stage: base {s['base_steps']} steps from random init, then {s['steps']} steps full vs LoRA r=16 (vs LoRA "
          f"r=16 with the routed experts); success on {s['eval_episodes']} held-out episodes per robot")
    rows = [[label, f"{success[label]['nav']:.2f}", f"{success[label]['arm']:.2f}", f"{mean[label]:.3f}",
             f"{runs[label]['final_loss']:.3f}", f"{timings[label]:.0f}"] for label in RUNS]
    print_table(["run", "nav success", "arm success", "mean", "final loss", "train s"], rows)
    shown = {k: "n/a" if v is None else f"{v:.2f}" for k, v in ratio.items()}
    print(f"LoRA / full success: {shown['lora']}, with the routed experts {shown['lora_experts']}; adapter "
          f"{adapter_mb:.2f} MB ({experts_mb:.2f} MB with the experts) vs full checkpoint {full_mb:.2f} MB")
    return {"success": success, "mean_success": {k: round(v, 4) for k, v in mean.items()},
            "lora_over_full": None if ratio["lora"] is None else round(ratio["lora"], 4),
            "lora_experts_over_full": None if ratio["lora_experts"] is None else round(ratio["lora_experts"], 4),
            "adapter_mb": round(adapter_mb, 3), "experts_adapter_mb": round(experts_mb, 3),
            "full_checkpoint_mb": round(full_mb, 3), "settings": s, "seconds": {k: round(v, 1) for k, v in timings.items()},
            "quick": bool(cfg.get("quick"))}
