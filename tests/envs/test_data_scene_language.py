"""Scene-language JSONL: generation from the env scenes, DeepSeek-VL2 boxes, canonical answers, the loader's checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from envs.scene import COLOURS
from envs.scene_language import (
    ASSISTANT,
    STAGES,
    USER,
    SceneLanguageFormatError,
    from_det,
    generate_scene_language,
    load_conversations,
    parse_grounding,
    score_answer,
    to_det,
)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    base = tmp_path_factory.mktemp("scene_language")
    return {stage: generate_scene_language(base, stage, 12, seed=5, image_size=64) for stage in STAGES}


def test_stages_load_back_in_the_documented_format(generated):
    for stage, path in generated.items():
        records = load_conversations(path)
        assert len(records) == 12
        for record in records:
            assert record.conversation[0]["role"] == USER and record.conversation[0]["content"].startswith("<image>\n")
            assert [t["role"] for t in record.conversation] == [USER, ASSISTANT] * (len(record.conversation) // 2)
            assert Image.open(record.images[0]).size == (64, 64)
            assert len(record.meta["turns"]) == len(record.answers)
            assert record.meta["stage"] == stage
        turns = [len(r.conversation) // 2 for r in records]
        if stage == "sft":
            assert min(turns) >= 3
        else:
            assert set(turns) == {1}
    align = load_conversations(generated["align"])
    assert all(turn["kind"] == "caption" for r in align for turn in r.meta["turns"])
    kinds = {turn["kind"] for r in load_conversations(generated["pretrain"]) for turn in r.meta["turns"]}
    assert len(kinds) >= 2


def test_generation_is_deterministic(generated, tmp_path):
    again = generate_scene_language(tmp_path, "sft", 12, seed=5, image_size=64)
    assert again.read_text() == generated["sft"].read_text()


def test_env_kwargs_reach_the_scenes(tmp_path):
    default = load_conversations(generate_scene_language(tmp_path / "default", "sft", 8, seed=5, image_size=64,
                                                         env_ids=["vla/PointNav-v0"]))
    single = load_conversations(generate_scene_language(tmp_path / "single", "sft", 8, seed=5, image_size=64,
                                                        env_ids=["vla/PointNav-v0"], env_kwargs={"num_objects": [1, 1]}))
    assert {len(r.meta["objects"]) for r in single} == {1}
    assert min(len(r.meta["objects"]) for r in default) >= 2


def test_answers_match_the_ground_truth_and_the_pixels(generated):
    checked = {"grounding": 0, "count": 0, "colour_of_shape": 0, "caption": 0}
    for stage in STAGES:
        for record in load_conversations(generated[stage]):
            image = np.asarray(Image.open(record.images[0]).convert("RGB"))
            width, height = record.meta["image_size"]
            objects = record.meta["objects"]
            for turn, question, answer in zip(record.meta["turns"], record.conversation[0::2], record.answers):
                assert score_answer(answer, turn)
                kind = turn["kind"]
                if kind == "grounding":
                    obj = next(o for o in objects if f"the {o['name']}" == turn["ref"])
                    assert turn["det"] == [round(v * 999 / s) for v, s in zip(obj["bbox"], (width, height, width, height))]
                    [(ref, [det])] = parse_grounding(answer)
                    assert ref == turn["ref"] and det == turn["det"]
                    x1, y1, x2, y2 = (int(round(v)) for v in from_det(det, width, height))
                    colour = np.array(COLOURS[obj["colour"]])
                    assert np.all(image[y1:y2, x1:x2] == colour, axis=-1).mean() > 0.3
                elif kind == "count":
                    assert answer == str(len(objects))
                elif kind == "colour_of_shape":
                    shape = question["content"].split("the ")[-1].rstrip("?")
                    assert answer == next(o["colour"] for o in objects if o["shape"] == shape)
                elif kind == "caption":
                    assert all(o["name"] in answer for o in objects)
                checked[kind] = checked.get(kind, 0) + 1
    assert all(count > 0 for count in checked.values()), checked


def test_grounding_scores_the_one_box_the_answer_gives():
    truth = {"kind": "grounding", "ref": "the red square", "det": [100, 100, 300, 300]}
    right, wrong, other = "[110,100,300,310]", "[500,500,700,700]", "[0,0,50,50]"
    assert score_answer(f"<|ref|>the red square<|/ref|><|det|>[{right}]<|/det|>", truth)  # exactly one right box
    # the right box plus extra boxes (in the same det block or in another ref/det pair) is wrong
    assert not score_answer(f"<|ref|>the red square<|/ref|><|det|>[{right},{wrong}]<|/det|>", truth)
    assert not score_answer(f"<|ref|>the red square<|/ref|><|det|>[{right},{other},{wrong}]<|/det|>", truth)
    assert not score_answer(f"<|ref|>the red square<|/ref|><|det|>[{right}]<|/det|><|ref|>x<|/ref|><|det|>[{wrong}]<|/det|>", truth)
    # a wrong first box followed by the right one is wrong
    assert not score_answer(f"<|ref|>the red square<|/ref|><|det|>[{wrong},{right}]<|/det|>", truth)
    assert not score_answer(f"<|ref|>a<|/ref|><|det|>[{wrong}]<|/det|><|ref|>the red square<|/ref|><|det|>[{right}]<|/det|>", truth)
    # so the score of a many-box answer is no better than that of its first box alone
    assert not score_answer(f"<|ref|>the red square<|/ref|><|det|>[{wrong}]<|/det|>", truth)


def test_held_out_check_refuses_trained_scenes(tmp_path):
    from envs.scene_language import SceneOverlapError, check_held_out, scene_keys

    kwargs = dict(image_size=32, env_ids=["vla/PointNav-v0", "vla/ArmReach-v0"])
    train = load_conversations(generate_scene_language(tmp_path / "train", "align", 4, seed=10, **kwargs))
    held_out = load_conversations(generate_scene_language(tmp_path / "eval", "sft", 2, seed=20, **kwargs))
    overlapping = load_conversations(generate_scene_language(tmp_path / "again", "sft", 2, seed=12, **kwargs))
    trained = scene_keys(train)
    assert trained == {("vla/PointNav-v0", 10), ("vla/ArmReach-v0", 11), ("vla/PointNav-v0", 12), ("vla/ArmReach-v0", 13)}
    assert check_held_out(held_out, trained) == 2
    with pytest.raises(SceneOverlapError, match="2 of 2 held-out scenes were trained on .e.g. vla/ArmReach-v0 seed 13"):
        check_held_out(overlapping, trained)
    # a robot dataset's episode seeds count as trained scenes of its env
    with pytest.raises(SceneOverlapError, match="1 of 2"):
        check_held_out(held_out, {("vla/ArmReach-v0", 21)})
    assert check_held_out(held_out, {("vla/PointNav-v0", 21)}) == 2  # another env's seed 21 is another scene


def test_scoring_and_boxes():
    assert to_det([0, 0, 64, 32], 64, 64) == [0, 0, 999, 500]
    truth = {"kind": "grounding", "det": [100, 100, 300, 300]}
    assert score_answer("<|ref|>x<|/ref|><|det|>[[110,100,300,310]]<|/det|>", truth)
    assert not score_answer("<|ref|>x<|/ref|><|det|>[[500,500,700,700]]<|/det|>", truth)
    assert not score_answer("somewhere on the left", truth)
    assert score_answer("The red square.", {"kind": "extreme", "answer": "red square"})
    assert not score_answer("blue square", {"kind": "extreme", "answer": "red square"})


GOOD = {
    "id": "mine-1",
    "images": ["a.png"],
    "conversation": [{"role": USER, "content": "<image>\nWhat colour is the square?"}, {"role": ASSISTANT, "content": "red"}],
}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps([1, 2]), "must be a JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "conversation"}), "missing key 'conversation'"),
        (json.dumps({**GOOD, "images": ["missing.png"]}), "image 'missing.png' not found"),
        (json.dumps({**GOOD, "images": []}), "1 <image> placeholder\\(s\\) for 0 image"),
        (json.dumps({**GOOD, "conversation": GOOD["conversation"][::-1]}), "turn 0 has role '<\\|Assistant\\|>'"),
        (json.dumps({**GOOD, "conversation": GOOD["conversation"][:1]}), "last turn must be the assistant"),
        (json.dumps({**GOOD, "conversation": [{"role": USER}]}), "exactly 'role' and 'content'"),
        (json.dumps({**GOOD, "meta": [1]}), "'meta' must be an object"),
        (json.dumps(GOOD), "duplicate id 'mine-1' \\(first on line 1\\)"),
    ],
)
def test_loader_reports_file_and_line(tmp_path, bad_line, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + bad_line + "\n")
    with pytest.raises(SceneLanguageFormatError, match=f"mine.jsonl:3: .*{message}"):
        load_conversations(path)


def test_user_made_file_without_meta_loads(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    [record] = load_conversations(path)
    assert record.id == "mine-1" and record.meta == {} and record.answers == ["red"] and record.line == 1
    assert record.images == [tmp_path / "a.png"]


def test_score_turns_counts_every_scored_turn_by_kind(generated):
    from envs.scene_language import QUESTION_KINDS, score_turns, scored_turns

    records = load_conversations(generated["sft"])
    turns = scored_turns(records)
    assert turns and all("<image>" not in question for _, question, _ in turns)
    perfect = score_turns(records, lambda record, question, meta: meta["answer"])
    assert perfect["vqa_accuracy"] == 1.0 and perfect["grounding_acc"] == 1.0
    assert perfect["n_vqa"] + perfect["n_grounding"] == len(turns)
    assert sum(n["total"] for n in perfect["by_kind"].values()) == len(turns)
    assert set(perfect["by_kind"]) <= set(QUESTION_KINDS) | {"grounding"}
    silent = score_turns(records, lambda record, question, meta: "", examples=3)
    assert silent["vqa_accuracy"] == 0.0 and silent["grounding_acc"] == 0.0 and len(silent["examples"]) == 3
    for record in records:
        record.meta = {}  # a user-made file without ground truth cannot be scored: say so, do not report 0.00
    with pytest.raises(ValueError, match="meta.turns"):
        score_turns(records, lambda record, question, meta: "")


def test_blind_baseline_answers_from_the_text_alone(tmp_path):
    from envs.scene_language import blind_baseline

    # one object per scene: "How many shapes are there?" is always "1", which the text alone gives away
    train = load_conversations(generate_scene_language(tmp_path / "train", "sft", 30, seed=1, image_size=64,
                                                       env_kwargs={"num_objects": [1, 1]}))
    held_out = load_conversations(generate_scene_language(tmp_path / "test", "sft", 20, seed=900, image_size=64,
                                                          env_kwargs={"num_objects": [1, 1]}))
    blind = blind_baseline(train, held_out)
    assert blind["by_kind"]["count"]["accuracy"] == 1.0
    # colours and boxes are not in the text: the mean box of 1-object scenes at random places rarely overlaps
    assert blind["by_kind"]["colour_of_shape"]["accuracy"] < 0.7
    assert blind["grounding_acc"] < 0.5
    assert all(e["answer"] != "" for e in blind["examples"])


def test_wrist_camera_records_show_the_wrist_frame_with_its_own_boxes(tmp_path):
    path = generate_scene_language(tmp_path, "align", 6, seed=5, image_size=64, env_ids=["vla/ArmReach-v0"],
                                   camera="wrist", env_kwargs={"near_start": 1.0})
    top = load_conversations(generate_scene_language(tmp_path, "align", 6, seed=5, image_size=64,
                                                     env_ids=["vla/ArmReach-v0"], env_kwargs={"near_start": 1.0}))
    assert path.name == "align-wrist.jsonl"
    records = load_conversations(path)
    assert [r.meta["camera"] for r in records] == ["wrist"] * 6 and "camera" not in top[0].meta
    for record, same_scene in zip(records, top):
        assert record.id != same_scene.id and record.images[0] != same_scene.images[0]
        image = np.array(Image.open(record.images[0]))
        assert not np.array_equal(image, np.array(Image.open(same_scene.images[0])))  # a 2x zoom on the end effector
        for obj in record.meta["objects"]:  # each listed object is painted inside its wrist box
            x1, y1, x2, y2 = obj["bbox"]
            assert np.all(image[y1:y2, x1:x2] == np.array(COLOURS[obj["colour"]]), axis=-1).any()
    assert sum(len(r.meta["objects"]) for r in records) > 0  # started near the target: it is in view
