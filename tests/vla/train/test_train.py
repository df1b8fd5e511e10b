"""Training: stages (freezing, label masking), schedule, checkpoints (resume equality, corruption, SIGKILL), logging,
the stage-task registry, and 2-process DDP / FSDP2 runs on CPU (gloo) matching a single process."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, drop_after, two_processes_match_one
from vla.config import load_config
from vla.train import run
from vla.train.checkpoint import CheckpointCorrupt, find_resumable, list_checkpoints, validate_checkpoint
from vla.train.log import read_csv
from vla.train.stages import (LossOutput, ModuleGroup, PrefetchedBatches, ShardedBatches, StageContext, StageTask, StageTaskError,
                              apply_freezing, gradients_for_all, make_stage_task, register_stage_task, vl2_module_group)
from vla.train.trainer import ScheduleConfig, Trainer, TrainerConfig, lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")


def train_cfg(out: Path, stage: str = "sft", *extra: str):
    """A tiny, quiet run: 16 generated records, micro-batch 2, checkpoints every 2 steps."""
    return load_config("train", [f"stage={stage}", f"out={out}", "stage.steps=4", "stage.data.generate=16",
                                 "micro_batch=2", "checkpoint.every=2", "checkpoint.keep_last=5", "log.progress=false",
                                 "log.tensorboard=false", "log.plot=false", *extra])


def make_task(tmp_path: Path, stage: str, **ctx):
    return make_stage_task(StageContext(name=stage, out_dir=tmp_path, data={"generate": 8}, **ctx))


# ---------------------------------------------------------------------------------------------------- schedule
def test_schedule_values():
    cos = ScheduleConfig(kind="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, 20, cos) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 20, cos) == pytest.approx(1.0)
    assert lr_factor(19, 20, cos) == pytest.approx(0.1)
    mid = 4 + (20 - 4 - 1) / 2
    assert lr_factor(int(mid), 20, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * int(mid - 4) / 15)))
    step = ScheduleConfig(kind="step", warmup_steps=0, milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(s, 8, step) for s in (0, 3, 4, 5, 6, 7)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    const = ScheduleConfig(kind="constant", warmup_steps=2)
    assert [lr_factor(s, 8, const) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------------- stages
def test_module_groups_cover_the_model(tmp_path):
    task = make_task(tmp_path, "sft")
    groups = {vl2_module_group(n) for n, _ in task.module.named_parameters()}
    assert groups == {"vision_tower", "projector", "embed", "attention", "norms", "dense_mlp", "router", "experts",
                      "shared_experts", "lm_head"}
    assert vl2_module_group("vision_encoder.image_newline") == "projector"
    assert vl2_module_group("language.model.layers.1.self_attn.kv_a_layernorm.weight") == "norms"


@pytest.mark.parametrize("stage, frozen, expect_trainable", [
    ("align", [], {"vision_tower", "projector"}),
    ("pretrain", [], "all"),
    ("sft", [], "all"),
    ("sft", ["vision_tower", "embed"], "all-but"),
])
def test_freezing_gradients_only_where_expected(tmp_path, stage, frozen, expect_trainable):
    ctx = {"trainable": ["vision_tower", "projector"] if stage == "align" else ["all"], "frozen": frozen}
    task = make_task(tmp_path, stage, **ctx)
    groups = task.parameter_groups()
    apply_freezing(groups)
    names = {g.name for g in groups}
    want = expect_trainable if isinstance(expect_trainable, set) else names - set(frozen)
    assert {g.name for g in groups if g.trainable} == want
    # a micro-batch that holds images (pretrain mixes text-only samples in)
    batches = task.batches(0, 1, 2)
    batch = next(b for b in batches if int(b["images_spatial_crop"].sum()) > 0)
    task.module.train()
    terms = task.loss(task.module, batch).terms
    sum(terms.values()).backward()
    for g in groups:
        for name, p in g.params:
            if g.trainable:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{stage}: {name} ({g.name}) got no gradient"
            else:
                assert p.grad is None, f"{stage}: frozen {name} ({g.name}) got a gradient"


def _answer_token_mask(task, record) -> torch.Tensor:
    """Expected supervised positions of an sft conversation: each answer's tokens + EOS."""
    sample = task.processor.process(record.conversation, [str(p) for p in record.images])
    ids, expected = sample["input_ids"].tolist(), torch.zeros(len(sample["input_ids"]), dtype=torch.bool)
    tok = task.tokenizer
    pos = 0
    for turn in record.conversation:
        if turn["role"] == "<|Assistant|>":
            answer = tok.encode(turn["content"].strip()) + [tok.eos_id]
            for start in range(pos, len(ids) - len(answer) + 1):
                if ids[start:start + len(answer)] == answer:
                    expected[start:start + len(answer)] = True
                    pos = start + len(answer)
                    break
            else:
                raise AssertionError("answer not found in the token ids")
    return sample, expected


def test_label_masking_per_stage(tmp_path):
    sft = make_task(tmp_path / "sft", "sft")
    record = sft.records[0]
    sample, expected = _answer_token_mask(sft, record)
    # position 0 (BOS) is never a target of the shifted loss
    assert ((sample["labels"][1:] != -100) == expected[1:]).all(), "sft supervises answers + EOS only"
    assert (sample["labels"][sample["images_seq_mask"]] == -100).all()
    batch = sft.batches(0, 1, 4).__next__()
    assert (batch["labels"][~batch["attention_mask"]] == -100).all(), "padding is never supervised"
    assert (batch["labels"][batch["images_seq_mask"]] == -100).all(), "image positions are never supervised"

    align = make_task(tmp_path / "align", "align", trainable=["vision"])
    s = align.sample(0)
    n_labels = int((s["labels"][1:] != -100).sum())
    caption = align.records[align._schedule(0)[1]].conversation[1]["content"]
    assert n_labels == len(align.tokenizer.encode(caption.strip())) + 1, "align: the caption + EOS only"

    pretrain = make_task(tmp_path / "pre", "pretrain")
    kinds = [bool(pretrain.sample(i)["images_spatial_crop"].sum()) for i in range(200)]
    assert kinds == [pretrain._schedule(i)[0] == 0 for i in range(200)], "text-only where the sampler says text"
    text_share = sum(pretrain._schedule(i)[0] == 1 for i in range(4000)) / 4000
    assert 0.28 < text_share < 0.32, f"about 30% text-only samples, got {text_share}"
    for i in range(40):
        s = pretrain.sample(i)
        if s["images_spatial_crop"].sum() == 0:  # text-only: every token is supervised
            assert (s["labels"] == s["input_ids"]).all()
        else:  # image-text: every text token, no image position (prompt not masked in pretraining)
            assert ((s["labels"] != -100) == ~s["images_seq_mask"]).all()


def _grads_through_gradients_for_all() -> list[torch.Tensor | None]:
    torch.manual_seed(0)
    used, unused = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))
    for _ in range(2):  # accumulated over two backward passes, as with grad_accum
        gradients_for_all((used ** 2).sum(), [used, unused]).backward()
    return [used.grad, unused.grad]


def test_gradients_for_all_gives_unused_parameters_zeros_in_one_process_and_in_a_group(tmp_path):
    alone = _grads_through_gradients_for_all()  # one process: zeros filled in when the backward pass ends
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grouped = _grads_through_gradients_for_all()  # in a process group: zeros from the graph
    finally:
        torch.distributed.destroy_process_group()
    torch.manual_seed(0)
    expected = 2 * 2 * torch.randn(3)  # d/dx of x^2, twice
    for grads in (alone, grouped):  # (a plain backward pass leaves the unused one's gradient None)
        assert grads[1] is not None and torch.equal(grads[0], expected) and torch.equal(grads[1], torch.zeros(2, 2))


def test_sharded_batches_cover_the_global_batch():
    seen = []
    one = ShardedBatches(lambda i: i, lambda xs: xs, rank=0, world=1, micro_batch=4)
    two = [ShardedBatches(lambda i: i, lambda xs: xs, rank=r, world=2, micro_batch=2) for r in range(2)]
    for _ in range(3):
        seen.append((next(one), sorted(next(two[0]) + next(two[1]))))
    assert all(a == b for a, b in seen)
    assert one.state_dict() == two[0].state_dict() == two[1].state_dict() == {"next_index": 12}


def test_prefetched_batches_are_the_same_stream_and_resume_where_handed_out():
    plain = ShardedBatches(lambda i: i * i, list, rank=1, world=2, micro_batch=3)
    ahead = PrefetchedBatches(ShardedBatches(lambda i: i * i, list, rank=1, world=2, micro_batch=3), workers=2)
    assert [next(ahead) for _ in range(4)] == [next(plain) for _ in range(4)]
    assert ahead.state_dict() == plain.state_dict() == {"next_index": 24}, "what was handed out, not drawn ahead"
    ahead.load_state_dict({"next_index": 9})  # not a multiple of a round: saved with another process count
    plain.load_state_dict({"next_index": 9})
    assert [next(ahead) for _ in range(2)] == [next(plain) for _ in range(2)]
    ahead.close()
    with pytest.raises(ValueError, match="workers must be >= 1"):
        PrefetchedBatches(plain, workers=0)


def test_prefetched_batches_refuse_a_platform_without_fork(monkeypatch):
    import multiprocessing
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])  # as on Windows
    with pytest.raises(ValueError, match="needs the 'fork' start method.*set data_workers=0"):
        PrefetchedBatches(ShardedBatches(lambda i: i, list, rank=0, world=1, micro_batch=2), workers=1)


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_train_writes_logs_and_loadable_checkpoints(tmp_path):
    from backbone.deepseek_vl2 import load_deepseek_vl2
    from vla.cli import main as cli_main

    out = tmp_path / "run"
    rc = cli_main(["train", "stage=align", f"out={out}", "stage.steps=4", "stage.data.generate=8", "micro_batch=2",
                   "checkpoint.every=1", "checkpoint.keep_last=2", "log.progress=false"])
    assert rc == 0
    steps = [s for s, _ in list_checkpoints(out / "checkpoints")]
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert steps[-2:] == [3, 4] and set(steps) <= {3, 4, best["step"]}, "keep the last 2 and the best"
    rows = read_csv(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("train/loss", "loss/lm", "loss/aux", "router/load_entropy", "train/grad_norm", "train/lr",
                "train/tokens_per_s"):
        assert all(key in r for r in rows), key
    assert all(abs(r["train/loss"] - r["loss/lm"] - r["loss/aux"]) < 1e-5 for r in rows)
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    model = load_deepseek_vl2(out / "checkpoints" / "step-00000004")  # official format
    assert (out / "checkpoints" / "step-00000004" / "tokenizer.json").is_file()
    # align froze the language model: its weights equal the step-3 ones, the vision tower's moved
    before = load_deepseek_vl2(out / "checkpoints" / "step-00000003").state_dict()
    after = model.state_dict()
    assert torch.equal(before["language.lm_head.weight"], after["language.lm_head.weight"])
    assert not torch.equal(before["vision_encoder.projector.layers.0.weight"], after["vision_encoder.projector.layers.0.weight"])


def test_next_stage_starts_from_previous_checkpoint(tmp_path):
    first = run(train_cfg(tmp_path / "align", "align", "stage.steps=2"))
    second = run(train_cfg(tmp_path / "sft", "sft", f"init_from={first['checkpoint']}", "stage.steps=1"))
    assert second["steps"] == 1
    cfg = json.loads((Path(second["checkpoint"]) / "config.json").read_text())
    assert cfg["language_config"]["vocab_size"] == json.loads((Path(first["checkpoint"]) / "config.json").read_text())["language_config"]["vocab_size"]


def test_vision_tower_overrides_reach_the_checkpoint(tmp_path):
    summary = run(train_cfg(tmp_path, "align", "stage.steps=1", "model.vision={width: 48, layers: 1, heads: 2, mlp_dim: 96}"))
    cfg = json.loads((Path(summary["checkpoint"]) / "config.json").read_text())
    assert (cfg["vision_config"]["width"], cfg["vision_config"]["layers"], cfg["projector_config"]["input_dim"]) == (48, 1, 48)


def test_resume_continues_the_same_trajectory(tmp_path):
    import shutil

    ref = run(train_cfg(tmp_path / "ref", "pretrain", "stage.steps=5", "grad_accum=2", "micro_batch=1"))
    # The same run "died" after its step-2 checkpoint: a copy of its folder without the later checkpoints.
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", out)
    drop_after(out, 2)
    # resumed with its batches drawn ahead by worker processes: the same batches, from the checkpoint's position
    resumed = run(train_cfg(out, "pretrain", "stage.steps=5", "grad_accum=2", "micro_batch=1", "resume=true",
                            "data_workers=2"))
    assert sorted(resumed["losses"]) == [3, 4, 5]
    for step in (3, 4, 5):
        assert abs(resumed["losses"][step] - ref["losses"][step]) < 1e-6, step
    rows = read_csv(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5], "one trajectory in the CSV"


def test_corrupt_or_partial_checkpoints_fall_back_to_the_previous(tmp_path, capsys):
    out = tmp_path / "run"
    ref = run(train_cfg(out, "sft", "stage.steps=5"))  # checkpoints at 2, 4, 5
    ckpts = out / "checkpoints"
    # step 5: truncated safetensors; step 4: missing trainer state; a partial temp folder from a killed save
    weights = ckpts / "step-00000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (ckpts / "step-00000004" / "trainer_state.pt").unlink()
    (ckpts / ".tmp-step-00000006-123").mkdir()
    (ckpts / ".tmp-step-00000006-123" / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(CheckpointCorrupt, match="truncated"):
        validate_checkpoint(ckpts / "step-00000005")
    capsys.readouterr()
    resumed = run(train_cfg(out, "sft", "stage.steps=5", "resume=true"))
    printed = capsys.readouterr().out
    assert "step-00000005 is unusable" in printed and "step-00000004 is unusable" in printed
    assert "partial checkpoint" in printed and "resuming from" in printed and "step-00000002" in printed
    assert sorted(resumed["losses"]) == [3, 4, 5]
    assert all(abs(resumed["losses"][s] - ref["losses"][s]) < 1e-6 for s in (3, 4, 5))
    assert not (ckpts / ".tmp-step-00000006-123").exists()
    assert list(ckpts.glob("corrupt-step-00000005-*")), "the corrupt checkpoint is kept aside for inspection"
    assert find_resumable(ckpts).name == "step-00000005"


def test_sigkill_then_resume(tmp_path):
    """Kill a training process with SIGKILL mid-run, resume, and land on the uninterrupted run's losses."""
    args = ["stage=sft", "stage.steps=8", "stage.data.generate=16", "micro_batch=2", "checkpoint.every=1",
            "checkpoint.keep_last=3", "log.progress=false", "log.tensorboard=false", "log.plot=false", "threads=1"]
    out = tmp_path / "killed"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "vla.train", *args, f"out={out}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list_checkpoints(out / "checkpoints")) < 3:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(s for s, _ in list_checkpoints(out / "checkpoints"))
    assert killed_at < 8
    resumed = run(load_config("train", [*args, f"out={out}", "resume=true"]))
    ref = run(load_config("train", [*args, f"out={tmp_path / 'ref'}"]))
    first = min(resumed["losses"])
    assert first >= 2 and max(resumed["losses"]) == 8
    for step in range(first, 9):
        assert abs(resumed["losses"][step] - ref["losses"][step]) < 1e-6, step


def _stop_when_logging(proc: subprocess.Popen, out: Path, signum: int, rows: int = 2) -> None:
    """Send `signum` to `proc` once its run has logged `rows` steps (it must still be running then)."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.csv").is_file() and len((out / "metrics.csv").read_text().splitlines()) > rows:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    os.kill(proc.pid, signum)


def test_ctrl_c_checkpoints_the_step_it_finished_and_resume_continues(tmp_path):
    """SIGINT (Ctrl-C) ends a run after its step in progress with a checkpoint of that step (no periodic ones here),
    exit 130 with one line; resumed from it, the run goes on as the uninterrupted one (constant lr, so that the
    interrupted 10,000-step run and the short reference share their schedule)."""
    args = ["stage=sft", "stage.data.generate=16", "micro_batch=2", "checkpoint.every=0", "log.progress=false",
            "log.tensorboard=false", "log.plot=false", "threads=1", "stage.schedule.kind=constant"]
    out = tmp_path / "stopped"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "vla.train", *args, "stage.steps=10000", "data_workers=1",
                             f"out={out}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _stop_when_logging(proc, out, signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    [(step, path)] = list_checkpoints(out / "checkpoints")
    assert 2 <= step < 10000
    assert err.strip().splitlines()[-1] == (f"vla train: stopped by SIGINT at step {step} of 10000; checkpoint {path}: "
                                            f"the same command with resume=true continues it")
    validate_checkpoint(path)
    resumed = run(load_config("train", [*args, f"stage.steps={step + 2}", f"out={out}", "resume=true"]))
    ref = run(load_config("train", [*args, f"stage.steps={step + 2}", f"out={tmp_path / 'ref'}"]))
    assert sorted(resumed["losses"]) == [step + 1, step + 2]
    for s in (step + 1, step + 2):
        assert abs(resumed["losses"][s] - ref["losses"][s]) < 1e-6, s


def test_sigterm_under_torchrun_stops_every_process_at_one_step(tmp_path):
    """torchrun forwards SIGTERM (a scheduler's preemption) to its processes: they agree on one step, write one
    checkpoint of both, and the stop line is printed once."""
    args = ["stage=sft", "stage.steps=10000", "stage.data.generate=16", "micro_batch=2", "checkpoint.every=0",
            "log.progress=false", "log.tensorboard=false", "log.plot=false", "threads=1"]
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "vla.train",
           *args, f"out={out}"]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _stop_when_logging(proc, out, signal.SIGTERM)
        printed, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    [(step, path)] = list_checkpoints(out / "checkpoints")
    assert [line for line in err.splitlines() if line.startswith("vla train:")] == [
        f"vla train: stopped by SIGTERM at step {step} of 10000; checkpoint {path}: the same command with resume=true "
        f"continues it"]
    assert printed.count(f"SIGTERM: stopping after step {step}, with a checkpoint") == 1
    validate_checkpoint(path)
    assert torch.load(path / "trainer_state.pt", weights_only=False)["world"] == 2


def test_a_second_ctrl_c_stops_at_once_but_not_torchruns_copy_of_the_first():
    from vla.train.trainer import StopOnSignal

    before = signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # within a second: the same stop, forwarded
        assert stop.signum == signal.SIGTERM
        stop._at -= 2.0
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------------------------------------------- registry
class ToyTask(StageTask):
    """A generic stage task: linear regression over two 'embodiments' (tests the base class's defaults, not VL2)."""

    name = "toy"

    def __init__(self, ctx: StageContext):
        torch.manual_seed(ctx.seed)
        self.module = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 1))
        self.saved: list[Path] = []

    def parameter_groups(self):
        return [ModuleGroup("body", list(self.module[0].named_parameters(prefix="0")), True, 1.0),
                ModuleGroup("head", list(self.module[1].named_parameters(prefix="1")), True, 0.5)]

    def batches(self, rank, world, micro_batch):
        def sample(i):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(3, generator=g)
            return {"x": x, "y": x.sum().reshape(1), "emb": "arm" if i % 2 else "nav"}

        def collate(samples):
            return {"x": torch.stack([s["x"] for s in samples]), "y": torch.stack([s["y"] for s in samples]),
                    "emb": [s["emb"] for s in samples]}

        return ShardedBatches(sample, collate, rank, world, micro_batch)

    def loss(self, model, batch):
        err = (model(batch["x"]) - batch["y"]).pow(2).squeeze(-1)
        metrics = {f"loss/{e}": float(err.detach()[[i for i, b in enumerate(batch["emb"]) if b == e]].mean())
                   for e in set(batch["emb"])}
        return LossOutput({"loss": err.mean()}, metrics)

    def save_weights(self, directory, state_dict):
        torch.save(state_dict, directory / "toy.pt")

    def load_weights(self, directory):
        self.module.load_state_dict(torch.load(directory / "toy.pt"))


def test_trainer_refuses_a_task_that_is_not_a_stage_task(tmp_path):
    class Duck:  # has the methods, not the declared hooks
        name, module = "duck", torch.nn.Linear(1, 1)

    with pytest.raises(TypeError, match="is not a vla.train.stages.StageTask"):
        Trainer(Duck(), TrainerConfig(out_dir=tmp_path))


def test_registered_task_trains_with_per_embodiment_losses(tmp_path):
    register_stage_task("toy", ToyTask)
    cfg = load_config("train", ["stage=vla", "stage.name=toy", f"out={tmp_path}", "stage.steps=30", "micro_batch=8",
                                "stage.optim.lr=0.05", "stage.schedule.warmup_steps=0", "log.progress=false",
                                "log.tensorboard=false", "checkpoint.every=0"])
    summary = run(cfg)
    assert summary["losses"][30] < 0.2 * summary["losses"][1]
    rows = read_csv(tmp_path / "metrics.csv")
    assert "loss/arm" in rows[0] and "loss/nav" in rows[0] and "loss/loss" in rows[0]
    assert (tmp_path / "checkpoints" / "step-00000030" / "toy.pt").is_file()


def test_unregistered_stage_fails_clearly(tmp_path, monkeypatch):
    with pytest.raises(StageTaskError, match="no registered task"):
        make_stage_task(StageContext(name="nope", out_dir=tmp_path))
    import vla.train.stages

    monkeypatch.setitem(vla.train.stages._PROVIDERS, "vla-missing", "vla.no_such_policy_module")
    with pytest.raises(StageTaskError, match="register_stage_task"):
        make_stage_task(StageContext(name="vla-missing", out_dir=tmp_path))


# ---------------------------------------------------------------------------------------------------- distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, mode):
    common = ["stage=pretrain", "stage.steps=3", "stage.data.generate=16", "checkpoint.every=2", "log.progress=false",
              "log.tensorboard=false", "log.plot=false", "stage.optim.lr=3e-3", "stage.schedule.warmup_steps=0"]
    one = two_processes_match_one(tmp_path, common, mode)
    # the 2-process checkpoint resumes in 1 process (any process count), on the same trajectory
    drop_after(tmp_path / "two", 2)
    resumed = run(load_config("train", [*common, f"out={tmp_path / 'two'}", "micro_batch=4", "resume=true"]))["losses"]
    assert abs(resumed[3] - one[3]) < 1e-5


# ---------------------------------------------------------------------------------------------------- switches
def test_activation_checkpointing_keeps_the_losses(tmp_path):
    plain = run(train_cfg(tmp_path / "plain", "sft", "stage.steps=2", "checkpoint.every=0"))
    ckpt = run(train_cfg(tmp_path / "ckpt", "sft", "stage.steps=2", "checkpoint.every=0", "activation_checkpointing=true"))
    assert all(abs(plain["losses"][s] - ckpt["losses"][s]) < 1e-6 for s in (1, 2))


def test_noaux_bias_update_runs_after_each_step(tmp_path):
    from backbone.checkpoint import read_safetensors

    summary = run(train_cfg(tmp_path, "sft", "stage.steps=2", "checkpoint.every=0", "+model.language.topk_method=noaux_tc",
                            "+model.language.scoring_func=sigmoid", "+model.language.norm_topk_prob=true"))
    state = read_safetensors(summary["checkpoint"])
    biases = [v for k, v in state.items() if k.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().max() > 0 for b in biases), "the expert bias moved"
    rows = read_csv(tmp_path / "metrics.csv")
    assert "loss/aux" not in rows[0], "no auxiliary loss with noaux_tc (the bias update balances instead)"
