"""Shared fixtures. Tests never download: the hub is off (as `./run.sh` sets it) before anything imports
huggingface_hub, which reads HF_HUB_OFFLINE once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine OpenMP spin-waits make multi-threaded steps up to 10x slower.
    Modules that train use it for every test (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def robot_data(tmp_path_factory):
    """Small data of both built-in robots, shared read-only by the tests that train the vla stage: `nav` and `arm`
    (LeRobot datasets, 2 episodes each, 32-px frames) and `lang/sft.jsonl` (6 scene conversations). Returns the root."""
    from envs.collect import collect_dataset
    from envs.scene_language import generate_scene_language

    root = tmp_path_factory.mktemp("robot_data")
    collect_dataset("vla/PointNav-v0", root / "nav", 2, image_size=32, progress=False)
    collect_dataset("vla/ArmReach-v0", root / "arm", 2, image_size=32, progress=False)
    generate_scene_language(root / "lang", "sft", 6, seed=0, image_size=32)
    return root
