"""What a rollout leaves behind: GIFs of episodes, and the summary of their results as numbers and markdown."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class EpisodeResult:
    env_id: str
    embodiment: str
    task: str
    seed: int
    success: bool
    sum_reward: float
    length: int


def save_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float, min_size: int = 192) -> Path:
    """Write frames as an animated GIF (nearest-neighbour upscaled so small renders stay visible)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    scale = max(1, int(np.ceil(min_size / max(min(height, width), 1))))
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)).resize((width * scale, height * scale), Image.NEAREST) for f in frames]
    duration = max(int(round(1000 / max(fps, 1))), 20)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)
    return path


def _aggregate(results: Sequence[EpisodeResult]) -> dict[str, float]:
    return {
        "episodes": len(results),
        "success_rate": float(np.mean([r.success for r in results])) if results else 0.0,
        "mean_sum_reward": float(np.mean([r.sum_reward for r in results])) if results else 0.0,
        "mean_length": float(np.mean([r.length for r in results])) if results else 0.0,
    }


def summarize(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Overall, per env, per embodiment and per task (env + task string) aggregates."""
    groups: dict[str, dict[str, list[EpisodeResult]]] = {"per_env": defaultdict(list), "per_embodiment": defaultdict(list), "per_task": defaultdict(list)}
    for r in results:
        groups["per_env"][r.env_id].append(r)
        groups["per_embodiment"][r.embodiment].append(r)
        groups["per_task"][f"{r.env_id}: {r.task}"].append(r)
    summary: dict[str, Any] = {"overall": _aggregate(results)}
    for name, group in groups.items():
        summary[name] = {key: _aggregate(group[key]) for key in sorted(group)}
    return summary


def markdown_table(summary: dict[str, Any], policy: str = "") -> str:
    lines = [f"# Evaluation{f' of {policy}' if policy else ''}", ""]
    for section, title in (("per_env", "env"), ("per_embodiment", "embodiment"), ("per_task", "task")):
        lines += [f"## per {title}", "", f"| {title} | episodes | success | mean return | mean length |", "|---|---:|---:|---:|---:|"]
        for key, row in summary.get(section, {}).items():
            lines.append(f"| {key.replace('|', '/')} | {row['episodes']} | {row['success_rate']:.3f} | {row['mean_sum_reward']:.3f} | {row['mean_length']:.1f} |")
        lines.append("")
    overall = summary["overall"]
    lines.append(
        f"**overall**: {overall['episodes']} episodes, success {overall['success_rate']:.3f}, "
        f"mean return {overall['mean_sum_reward']:.3f}, mean length {overall['mean_length']:.1f}"
    )
    for skipped in summary.get("skipped", []):
        lines.append(f"\nskipped {skipped['env_id']}: {skipped['reason']}")
    return "\n".join(lines) + "\n"
