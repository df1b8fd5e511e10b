"""`vla annotate`: boxes for a dataset made elsewhere, from a DeepSeek-VL2 checkpoint's grounding answers."""

from __future__ import annotations

import json

import pytest

from envs.collect import COLLECTION_FILE, collect_dataset, read_collection_record, write_collection_record
from envs.scene_language import box_iou, grounding_answer
from helpers import REPO
from vla.cli import main

MINI = str(REPO / "checkpoints" / "dsvl2-mini")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nav(tmp_path_factory):
    """Six demo-like PointNav episodes (2-3 objects, 64 px) whose recorded boxes are the simulator's."""
    root = tmp_path_factory.mktemp("annotate") / "nav"
    collect_dataset("vla/PointNav-v0", root, 6, image_size=64, seed=0, progress=False,
                    env_kwargs={"num_objects": [2, 3]})
    return root


def test_annotate_writes_the_checkpoints_boxes_where_the_dataset_had_none(nav, tmp_path, capsys):
    import shutil

    from envs.mixture import DataError, MixtureDataset

    truth = read_collection_record(nav)["episode_targets"]
    root = tmp_path / "nav"
    shutil.copytree(nav, root)
    (root / COLLECTION_FILE).unlink()  # as a dataset recorded elsewhere: no record at all
    assert main(["annotate", f"root={root}", f"checkpoint={MINI}", "progress=false"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["episodes"], line["no_ref"], line["camera"]) == (6, 0, "observation.images.top")
    record = read_collection_record(root)
    targets = record["episode_targets"]
    assert record["annotated"]["checkpoint"] == MINI and len(targets) == 6 == line["boxes"] + line["no_box"]
    assert [t["ref"] for t in targets if t] == [r["ref"] for r, t in zip(truth, targets) if t]  # "the red triangle"
    agree = sum(t is not None and box_iou(t["det"], r["det"]) >= 0.5 for t, r in zip(targets, truth))
    assert agree >= 4, (targets, truth)  # the mini grounds ~0.9 of the demo's first frames
    # what the vla stage's ground_target trains on: each sample's episode's grounding answer ("" without a box)
    member = MixtureDataset([str(root)]).members[0]
    assert [member.grounding(e) for e in range(6)] == [grounding_answer(**t) if t else "" for t in targets]

    # a policy that grounds first trains only on the episodes with a box (an answer without one leaves its episode out)
    record["episode_targets"] = [None, *truth[1:]]
    write_collection_record(root, record)
    grounded = MixtureDataset([str(root)], grounded_only=True)
    assert grounded.members[0].left_out == 1 and 0 < len(grounded) < len(MixtureDataset([str(root)]))
    assert {int(grounded[i]["episode_index"]) for i in range(len(grounded))} == {1, 2, 3, 4, 5}
    assert all(grounded[i]["grounding"] for i in range(len(grounded)))
    (root / COLLECTION_FILE).unlink()
    with pytest.raises(DataError, match="records no box.*vla annotate"):
        MixtureDataset([str(root)], grounded_only=True)

    # compare=true scores the answers against what the dataset records and writes nothing
    record["episode_targets"] = truth
    write_collection_record(root, record)
    assert main(["annotate", f"root={root}", f"checkpoint={MINI}", "compare=true", "progress=false"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["compared"] == 6 and line["agreement"] == pytest.approx(agree / 6, abs=1e-4)
    assert read_collection_record(root)["episode_targets"] == truth


@pytest.mark.parametrize("args, expected", [
    ([], ["already records episode_targets", "overwrite=true", "compare=true"]),
    (["overwrite=true", "ref_pattern='(fetch the .+)'"], ["no episode's task gives a referring expression",
                                                         "'go to the"]),
    (["overwrite=true", "ref_pattern='(the'"], ["not a regular expression"]),
    (["overwrite=true", "camera=observation.images.wrist"], ["no camera 'observation.images.wrist'",
                                                              "observation.images.top"]),
])
def test_annotate_errors_are_one_line(nav, args, expected, capsys):
    assert main(["annotate", f"root={nav}", f"checkpoint={MINI}", "progress=false", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("vla annotate: error:"), err
    for word in expected:
        assert word in err, (word, err)


def test_a_fixed_ref_and_a_pattern_without_groups():
    import re

    from vla.commands.annotate import ref_of

    pattern = re.compile(r"(the .+?)[.!]?$")
    assert ref_of("go to the red triangle.", None, pattern) == "the red triangle"
    assert ref_of("push the blue block into the goal", "the T-shaped block", pattern) == "the T-shaped block"
    assert ref_of("wave", None, pattern) is None
    assert ref_of("Pick up the cube", None, re.compile(r"cube")) == "cube"
