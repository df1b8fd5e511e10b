"""Training logs: a tqdm progress bar, a CSV of scalars, TensorBoard events and a loss-curve PNG at the end.

Only the first process logs. Scalars are plain `{name: float}` per step; names used by the trainer:
`train/loss` (the optimized total), `loss/<term>` (lm, aux, action, ...), `loss/<embodiment>` (from the task's
metrics), `router/load_entropy`, `train/grad_norm`, `train/lr`, `train/tokens_per_s`, `train/samples_per_s`.

On resume the CSV keeps only the rows up to the resumed step (rows logged by a killed run after its last checkpoint
are dropped) and TensorBoard purges the events past it, so both show one trajectory.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path


class CsvLog:
    """`metrics.csv`: one row per logged step; columns grow when new scalar names appear (the file is rewritten)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.rows: list[dict[str, str]] = []
        self.columns: list[str] = ["step"]
        if resume_step is not None and path.is_file():
            with path.open() as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if r.get("step") and int(r["step"]) <= resume_step]
        self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        row = {"step": str(step)} | {k: repr(float(v)) for k, v in scalars.items()}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)


def read_csv(path: Path) -> list[dict[str, float]]:
    """Rows of a metrics.csv as floats (empty cells left out)."""
    with Path(path).open() as f:
        return [{k: float(v) for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(f)]


class TrainLogger:
    """Progress bar + CSV + TensorBoard for one run (a no-op on processes other than the first)."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, *, enabled: bool = True, progress: bool = True,
                 csv_log: bool = True, tensorboard: bool = True, resumed: bool = False):
        self.enabled = enabled
        self.out_dir = out_dir
        self.csv = self.tb = self.bar = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if csv_log:
            self.csv = CsvLog(out_dir / "metrics.csv", resume_step=start_step if resumed else None)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if resumed else None)
            except ImportError:  # tensorboard not installed: CSV only
                self.tb = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        finite = {k: v for k, v in scalars.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if self.csv is not None:
            self.csv.log(step, finite)
        if self.tb is not None:
            for k, v in finite.items():
                self.tb.add_scalar(k, v, step)

    def progress(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.refresh()

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(csv_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Loss curves (`train/loss` and every `loss/*` column) against step; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(csv_path) if Path(csv_path).is_file() else []
    names = [k for k in (rows[0] if rows else {}) if k == "train/loss"]
    names += sorted({k for r in rows for k in r if k.startswith("loss/")})
    if not rows or not names:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        pts = [(r["step"], r[name]) for r in rows if name in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=2 if name == "train/loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log") if all(r.get("train/loss", 1) > 0 for r in rows) else None
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
