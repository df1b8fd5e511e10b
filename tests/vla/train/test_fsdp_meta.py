"""FSDP2 from the meta device (vla/train/fsdp_load.py): under 2 gloo processes each rank builds the model on meta, shards it
and reads only its own shards; the gathered model equals the single-process load exactly, and training from an
official-format folder / a policy checkpoint gives the losses of one process. `distributed=fsdp` without torchrun
fails with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import torchrun_train

QUIET = ["log.progress=false", "log.tensorboard=false", "log.plot=false"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_meta_load_under_two_processes_equals_the_single_process_model(tmp_path):
    from backbone.deepseek_vl2 import load_deepseek_vl2
    from benchmarks.fsdp import run_workers, write_model

    torch.manual_seed(0)
    write_model(tmp_path / "model", {"vocab_size": 300, "num_hidden_layers": 3})
    (tmp_path / "out").mkdir()
    reports = run_workers(tmp_path / "model", tmp_path / "out", gather=True, timeout=300)
    assert [r["rank"] for r in reports] == [0, 1]
    assert reports[0]["shard_bytes"] < sum(r["shard_bytes"] for r in reports)  # each holds a part
    gathered = torch.load(tmp_path / "out" / "full.pt")
    reference = load_deepseek_vl2(tmp_path / "model").state_dict()
    assert set(gathered) == set(reference)
    for key, value in reference.items():
        assert torch.equal(gathered[key], value), key


def fsdp_matches_one(tmp_path: Path, common: list[str], steps: int) -> None:
    """`common` under torchrun (2 processes x micro-batch 2, FSDP2 from the meta device) gives the losses of 1 process
    x micro-batch 4 to 1e-5, step by step."""
    from vla.config import load_config
    from vla.train import run

    two, stdout = torchrun_train(tmp_path / "two", *common, "micro_batch=2", "distributed=fsdp")
    assert "FSDP2 from the meta device" in stdout
    one = run(load_config("train", [*common, f"out={tmp_path / 'one'}", "micro_batch=4"]))["losses"]
    for step in range(1, steps + 1):
        assert abs(two[step] - one[step]) < 1e-5, (step, two[step], one[step])


def test_fsdp_from_an_official_folder_matches_one_process(tmp_path):
    from vla.config import load_config
    from vla.train import run

    common = ["stage=pretrain", "stage.data.generate=16", "checkpoint.every=0", *QUIET, "stage.optim.lr=3e-3",
              "stage.schedule.kind=constant", "stage.schedule.warmup_steps=0"]
    base = run(load_config("train", [*common, f"out={tmp_path / 'base'}", "stage.steps=1", "micro_batch=4"]))["checkpoint"]
    common += [f"init_from={base}", "stage.steps=3"]
    fsdp_matches_one(tmp_path, common, steps=3)


def test_fsdp_vla_stage_from_a_policy_checkpoint_matches_one_process(tmp_path, robot_data):
    from vla.config import load_config
    from vla.train import run

    common = ["stage=vla", "checkpoint.every=0", *QUIET, "stage.optim.lr=3e-3", "stage.schedule.kind=constant",
              "stage.schedule.warmup_steps=0", "model.language={hidden_size: 64, num_hidden_layers: 2}",
              f"stage.data={{datasets: [{{root: '{robot_data / 'nav'}'}}], chunk_len: 4}}"]
    base = run(load_config("train", [*common, f"out={tmp_path / 'base'}", "stage.steps=1", "micro_batch=4"]))["checkpoint"]
    common += [f"init_from={base}", "stage.steps=2"]
    fsdp_matches_one(tmp_path, common, steps=2)


def test_fsdp_vla_stage_from_an_official_folder_matches_one_process(tmp_path, robot_data):
    """The main user path (VL2 weights -> robot fine-tuning): the vla stage adds action and embodiment rows to the
    vocabulary; on meta they grow from the folder's rows when each process reads its shards (same noise)."""
    from vla.config import load_config
    from vla.train import run

    model = ["model.language={hidden_size: 64, num_hidden_layers: 2}", "checkpoint.every=0", *QUIET]
    base = run(load_config("train", ["stage=pretrain", "stage.data.generate=8", "stage.steps=1", "micro_batch=4",
                                     f"out={tmp_path / 'base'}", *model]))["checkpoint"]
    common = ["stage=vla", *model, "stage.optim.lr=3e-3", "stage.schedule.kind=constant",
              "stage.schedule.warmup_steps=0", f"init_from={base}", "stage.steps=2",
              f"stage.data={{datasets: [{{root: '{robot_data / 'nav'}'}}], chunk_len: 4}}"]
    fsdp_matches_one(tmp_path, common, steps=2)


def test_fsdp_lora_from_an_official_folder_matches_one_process_and_resumes(tmp_path, robot_data):
    """LoRA (the routed experts too) under FSDP2 from the meta device: adapters drawn on the CPU (the same values as one process), the token
    rows peft trains start as the grown rows read from the folder; the 2-process adapter checkpoint records the base's
    fingerprint (it loads) and resumes under 2 processes on the same trajectory."""
    from vla.config import load_config
    from vla.policy import VLAPolicy
    from vla.train import run

    model = ["model.language={hidden_size: 64, num_hidden_layers: 2}", *QUIET]
    base = run(load_config("train", ["stage=pretrain", "stage.data.generate=8", "stage.steps=1", "micro_batch=4",
                                     "checkpoint.every=0", f"out={tmp_path / 'base'}", *model]))["checkpoint"]
    common = ["stage=vla", *model, "stage.optim.lr=3e-3", "stage.schedule.kind=constant",
              "stage.schedule.warmup_steps=0", f"init_from={base}", "peft.method=lora", "peft.r=4", "peft.experts=true",
              f"stage.data={{datasets: [{{root: '{robot_data / 'nav'}'}}], chunk_len: 4}}"]
    one = run(load_config("train", [*common, f"out={tmp_path / 'one'}", "micro_batch=4", "stage.steps=3",
                                    "checkpoint.every=0"]))["losses"]
    two, stdout = torchrun_train(tmp_path / "two", *common, "micro_batch=2", "distributed=fsdp", "stage.steps=2",
                            "checkpoint.every=1")
    assert "FSDP2 from the meta device" in stdout
    for step in (1, 2):
        assert abs(two[step] - one[step]) < 1e-5, (step, two[step], one[step])
    VLAPolicy.load(tmp_path / "two" / "checkpoints" / "step-00000002")  # fingerprint of the gathered base: loads
    resumed, stdout = torchrun_train(tmp_path / "two", *common, "micro_batch=2", "distributed=fsdp", "stage.steps=3",
                                "checkpoint.every=1", "resume=true")
    assert "resuming from" in stdout
    assert abs(resumed[3] - one[3]) < 1e-5, (resumed[3], one[3])


def test_fsdp_without_torchrun_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from vla.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "stage=pretrain", f"out={tmp_path}", "distributed=fsdp", "stage.steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torchrun" in err and "distributed=fsdp" in err
