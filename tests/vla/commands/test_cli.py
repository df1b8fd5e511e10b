"""The `vla` command's errors: bad input is one line naming the problem and, where there is a choice, the choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from vla.cli import main


@pytest.mark.parametrize("argv, expected", [
    (["collect", "env=vla/Nope-v0", "episodes=1", "root=ROOT"], ["Nope", "vla/PointNav-v0", "vla/ArmReach-v0"]),
    (["collect", "env=vla/PointNav-v0", "episodes=1", "root=TMP"], ["already exists", "overwrite=true"]),
    (["collect", "env=vla/PointNav-v0", "episodes=0", "root=ROOT"], ["episodes must be >= 1"]),
    (["collect", "kind=nope", "root=ROOT"], ["unknown kind 'nope'", "scene_language"]),
    (["train", "stage=nope"], ["stage/nope", "align", "pretrain", "sft", "vision", "vla"]),
    (["train", "nosuchkey=1"], ["'nosuchkey'", "micro_batch", "init_from"]),
    (["train", "stage.optim.nope=1"], ["'stage.optim.nope'", "lr", "betas"]),
    (["train", "stage=vla", "stage.data.datasets=[ROOT]", "out=TMP/run"], ["data: no such dataset folder", "namespace/name"]),
    (["train", "stage=vla", "stage.data.datasets=[TMP]", "out=TMP/run"], ["not a LeRobot dataset (no meta/info.json)"]),
    (["train", "stage=vla", "stage.data.datasets=[nobody/no-such-dataset]", "out=TMP/run"],
     ["nobody/no-such-dataset: no such local folder, and not in the local Hugging Face cache", "HF_HUB_OFFLINE=1"]),
])
def test_bad_input_is_one_line_with_the_choices(argv, expected, tmp_path, capsys):
    argv = [a.replace("ROOT", str(tmp_path / "data")).replace("TMP", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"vla {argv[0]}: error:"), err
    for word in expected:
        assert word in err, (word, err)


def test_an_unknown_embodiment_is_one_line_with_the_known_ones(tmp_path, capsys):
    from envs.collect import collect_dataset

    collect_dataset("vla/PointNav-v0", tmp_path / "nav", 1, image_size=32, seed=0, progress=False)
    datasets = f"stage.data.datasets=[{{root: '{tmp_path / 'nav'}', embodiment: hexapod}}]"
    assert main(["train", "stage=vla", datasets, f"out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown embodiment 'hexapod'" in err and "arm3" in err and "point2d" in err, err


def test_modules_moved_into_sub_packages_import_under_their_old_names():
    """vla/ is split by role (train, policy, commands); the old flat names give the very same module objects."""
    import importlib

    import vla

    for old, new in vla.MOVED_MODULES.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from vla.stages import register_stage_task
    from vla.train.stages import register_stage_task as moved

    assert register_stage_task is moved
    top = sorted(p.stem for p in Path(vla.__file__).parent.glob("*.py"))
    assert top == ["__init__", "__main__", "cli", "config", "serve"], top


def test_vla_policy_specs_are_registered_by_a_call_not_by_imports():
    import subprocess
    import sys

    from helpers import REPO

    code = ("import envs.policies as p, vla.policy.env_policy, vla.policy.lerobot_checkpoint, vla.serve\n"
            "before = sorted(p.POLICY_FACTORIES)\n"
            "from vla.commands import register_env_policies\n"
            "register_env_policies(); register_env_policies()\n"
            "print(before, sorted(p.POLICY_FACTORIES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip().splitlines()[-1] == (
        "['expert', 'prior', 'random'] ['checkpoint', 'expert', 'lerobot', 'prior', 'random', 'remote']")


def test_help_shows_the_command_usage_and_survives_a_closed_pipe(capsys):
    import subprocess
    import sys

    from helpers import REPO

    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("`vla train`") and "stage=vla init_from=" in text and "config (override with key=value)" in text
    # `vla train --help | head -0`: the reader has gone before the help is written; no BrokenPipeError traceback
    proc = subprocess.Popen([sys.executable, "-m", "vla", "train", "--help"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and "Traceback" not in err, err


def test_ctrl_c_is_one_line_and_says_how_the_demo_goes_on(monkeypatch, capsys):
    import vla.commands.demo

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(vla.commands.demo, "main", interrupted)
    assert main(["demo", "demo.quick=true"]) == 130
    assert capsys.readouterr().err == ("vla demo: interrupted: the same command with demo.resume=true continues it "
                                       "(finished datasets and stages are kept)\n")
