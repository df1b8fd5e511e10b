"""CI runs the demo's smoke variant and checks the report and the final JSON line."""

import json
from pathlib import Path

from vla.cli import main


def test_demo_quick_writes_report_and_json(tmp_path, capsys):
    out = tmp_path / "demo"
    # the point robot's scenes hold two objects (the wrong-instruction baseline runs), the arm's one (it cannot)
    robots = ("robots=[{env: vla/PointNav-v0, name: nav, episodes: 6, env_kwargs: {num_objects: [2, 2]}}, "
              "{env: vla/ArmReach-v0, name: arm, episodes: 6, env_kwargs: {num_objects: [1, 1]}}]")
    assert main(["demo", "demo.quick=true", f"out={out}", robots]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last_line)
    for key in ("success", "baseline_success", "vqa_accuracy", "grounding_acc", "routing_nmi", "wall_s"):
        assert key in result, key
    assert result["routing_measured_on"] == "training frames"
    assert set(result["success"]) == {"point2d", "arm3"}
    from vla.config import load_config
    from vla.commands.demo import _settings

    episodes = int(_settings(load_config("demo", ["demo.quick=true"]))["eval_episodes"])
    rates = [*result["success"].values(),
             *(v for s in result["baseline_success"].values() for v in s.values() if v is not None)]
    assert len(rates) == 7 and all(0.0 <= v <= 1.0 and abs(v * episodes - round(v * episodes)) < 1e-9 for v in rates), rates
    assert set(result["baseline_success"]["arm3"]) == {"random", "no_vision", "wrong_instruction"}
    assert result["baseline_success"]["arm3"]["wrong_instruction"] is None  # one object per scene: nothing else to name
    assert result["baseline_success"]["point2d"]["wrong_instruction"] is not None
    assert 0.0 <= result["language_baseline"]["blind"]["vqa_accuracy"] <= 1.0
    assert "grounding" not in result["vqa_by_kind"] and all(0.0 <= v <= 1.0 for v in result["vqa_by_kind"].values())
    phases = result["phase_s"]
    assert list(phases)[0] == "collect demonstrations" and "stage vla" in phases
    assert sum(phases.values()) <= result["wall_s"] + 1.0
    report = (out / "report.md").read_text()
    assert "| robot | policy success | no-vision prior | random | wrong instruction |" in report and "![routing](routing.png)" in report
    assert "| question kind | questions | model | blind |" in report and "| stage vla |" in report
    assert "| point2d | " in report and "| arm3 | " in report and "n/a (one object per scene) |" in report
    assert "| before: the vla stage's start | after: the policy |" in report
    for key in ("start_vqa_accuracy", "start_grounding_acc"):
        assert 0.0 <= result[key] <= 1.0, key
    for key, before, after in (("vqa_retention", "start_vqa_accuracy", "vqa_accuracy"),
                               ("grounding_retention", "start_grounding_acc", "grounding_acc")):
        assert result[key] is None if result[before] == 0 else abs(result[key] - result[after] / result[before]) < 1e-3
    for name in ("report.md", "result.json", "loss_curves.png", "success.png", "routing.png", "routing.json", "grounding.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "result.json").read_text()) == result
    assert list((out / "eval").glob("*/videos/*.gif")), "rollout GIFs"
    assert (out / "eval" / "nav-wrong").is_dir() and not (out / "eval" / "arm-wrong").exists()
    # the vla stage keeps the configured parts of the starting checkpoint as they are (vla_frozen)
    from omegaconf import OmegaConf

    vla_stage = OmegaConf.load(out / "train" / "vla" / "config.yaml").stage
    assert list(vla_stage.frozen) == list(load_config("demo", ["demo.quick=true"]).vla_frozen) == ["vision_tower", "projector"]


def test_quick_keeps_the_configured_robots_with_fewer_episodes():
    from omegaconf import OmegaConf

    from vla.config import CONFIG_DIR, load_config
    from vla.commands.demo import _settings

    cfg = load_config("demo", ["demo.quick=true", "robots=[{env: vla/PointNav-v0, name: only, episodes: 300}]"])
    c = _settings(cfg)
    assert [(r["name"], r["episodes"]) for r in c["robots"]] == [("only", 6)]
    assert c["quick"] and c["steps"]["vla"] == OmegaConf.load(CONFIG_DIR / "demo.yaml").quick_overrides.steps.vla
    full = _settings(load_config("demo", []))
    assert not full["quick"] and all(r["episodes"] >= 100 for r in full["robots"])


def test_collect_env_kwargs_reach_only_the_collection(tmp_path):
    from vla.commands.demo import _collect_one, _settings
    from vla.config import load_config

    c = _settings(load_config("demo", ["demo.quick=true", "label=expert"]))
    robot = {"env": "vla/ArmReach-v0", "name": "arm", "episodes": 1, "env_kwargs": {"num_objects": [2, 3]},
             "collect_env_kwargs": {"near_start": 1.0}}
    _collect_one(c, robot, tmp_path / "arm")
    record = json.loads((tmp_path / "arm" / "meta" / "collection.json").read_text())
    assert record["env_kwargs"] == {"num_objects": [2, 3], "near_start": 1.0} and record["label"] == "expert"
    assert robot["env_kwargs"] == {"num_objects": [2, 3]}  # what the rollouts get is untouched


def test_report_says_how_grounding_is_scored_and_where_routing_was_measured(tmp_path):
    from vla.commands.demo import write_report

    c = {"quick": True, "from_scratch": False, "robots": [{"name": "p", "episodes": 2, "env": "vla/PointNav-v0"}],
         "steps": {"vla": 1}}
    success = {"point2d": {"policy": 0.5, "no-vision prior": 0.25, "random": 0.0, "videos": []}}
    by_kind = {"count": {"right": 1, "total": 2, "accuracy": 0.5}}
    scores = {"vqa_accuracy": 0.5, "grounding_acc": 0.25, "n_vqa": 2, "n_grounding": 4, "by_kind": by_kind}
    start = {"vqa_accuracy": 0.75, "grounding_acc": 0.5}
    language = {**scores, "blind": dict(scores), "start": start, "examples": [],
                "grounding_example": {"question": "Locate the red square", "answer": "", "image": "g.png"}}
    table = write_report(tmp_path, c, success, language, {"nmi_mean": 0.125},
                         {"wall_s": 10.0, "phase_s": {"collect demonstrations": 1.0}}, "checkpoints/dsvl2-mini")
    report = (tmp_path / "report.md").read_text()
    held_out, routing = table.split("| expert routing, measured on training frames | model |")
    assert "NMI" not in held_out and "| routing NMI (embodiment vs expert, action tokens of training frames) | 0.125 |" in routing
    assert "| grounding acc, one box with IoU >= 0.5 (4 boxes) | 0.50 | 0.25 | 0.25 |" in held_out
    assert "| VQA accuracy (2 questions) | 0.75 | 0.50 | 0.50 |" in held_out
    grounding_row = next(i for i, line in enumerate(report.splitlines()) if line.startswith("| grounding acc"))
    after = "\n".join(report.splitlines()[grounding_row:grounding_row + 10])
    assert "an answer is right only if it gives exactly one box and that box has IoU >= 0.5" in after
    assert "Started from `checkpoints/dsvl2-mini` (shipped; " in report
    assert "## Expert routing per robot (training frames)" in report and "Routing NMI is measured on training frames" in report


def test_a_crashed_demo_resumes_where_it_stopped_with_the_same_weights(tmp_path, capsys, monkeypatch):
    """`demo.resume=true` after a crash in the vla stage: the datasets are kept, the stage continues from its last
    checkpoint, and the policy is the one an uninterrupted stage makes (byte for byte)."""
    from vla.commands import demo
    from vla.config import load_config
    from vla.train.trainer import Trainer

    out = tmp_path / "demo"
    overrides = ["demo.quick=true", f"out={out}", "checkpoint_every=2",
                 "robots=[{env: vla/PointNav-v0, name: nav, episodes: 6, env_kwargs: {num_objects: [2, 2]}}]"]
    train_step, calls = Trainer._train_step, []

    def crash_at_step_3(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected crash")
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_step_3)
    assert main(["demo", *overrides]) == 2
    assert "injected crash" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_train_step", train_step)
    assert main(["demo", *overrides, "demo.resume=true"]) == 0
    log = capsys.readouterr().out
    assert "kept the 6 episodes of nav collected earlier" in log and "resuming from" in log and "step-00000002" in log
    assert json.loads(log.strip().splitlines()[-1])["success"].keys() == {"point2d"}

    # the same stage, uninterrupted, on the same data
    c = demo._settings(load_config("demo", overrides))
    start = demo.starting_checkpoint(c, out)[0]
    again = demo.train_vla(c, out, start, {"nav": str(out / "data" / "nav")}, demo.scene_language(c, out), run_name="again")
    ours = sorted(p.relative_to(out / "policy") for p in (out / "policy").rglob("*.safetensors"))
    assert ours and ours == sorted(p.relative_to(again["checkpoint"]) for p in Path(again["checkpoint"]).rglob("*.safetensors"))
    for name in ours:
        assert (out / "policy" / name).read_bytes() == (Path(again["checkpoint"]) / name).read_bytes(), name

    # resuming needs the same settings, and a demo run to resume
    assert main(["demo", *overrides, "demo.resume=true", "seed=1"]) == 2
    assert "was run with other settings (seed)" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    assert main(["demo", "demo.quick=true", f"out={tmp_path / 'other'}", "demo.resume=true"]) == 2
    assert "no demo_settings.json, so not a vla demo run to resume" in capsys.readouterr().err
