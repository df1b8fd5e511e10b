"""A training mixture over several LeRobotDatasets of different embodiments, each normalized with its own stats.

    mixture = MixtureDataset(
        [DatasetSpec("local/nav", root="data/nav", weight=2.0), DatasetSpec("local/arm", root="data/arm")],
        action_horizon=8,
    )
    loader = make_mixture_loader(mixture, batch_size=32, seed=0, num_workers=2)

Unlike lerobot's `MultiLeRobotDataset` no key is dropped and no stats are merged across robots: every dataset keeps
its cameras, action/state sizes, fps (action chunks use that dataset's own `delta_timestamps`) and its robot's
`Normalizer` (`mixture.normalizers[i]`, also by name in `mixture.normalizer_for(embodiment)`), which is what a policy
needs to unnormalize its actions for that robot. Action and state stats are computed from the data by default
(`stats_source="data"`, exact quantiles); `stats_source="meta"` reads `meta/stats.json`, whose quantiles lerobot
aggregates by averaging per-episode quantiles (see envs/normalize.py for how far off that can be).
`cache_frames=True` keeps every frame in memory (uint8, 12 KB per 64x64 camera frame): datasets that store images in
their parquet files are read whole at construction (one columnar read, ~1 s per 10k frames, then samples are
assembled from arrays exactly as lerobot assembles them); video datasets keep each frame once it was decoded.

Sample layout (with `pad=True`, the default, so the default collate stacks embodiments together):

| key                          | shape / type         |                                                         |
|------------------------------|----------------------|---------------------------------------------------------|
| observation.images.<camera>  | float32 (3, H, W)    | every camera of the mixture, [0, 1]; zeros if absent     |
| camera_mask                  | bool (num_cameras,)  | which cameras this sample really has (`mixture.cameras`) |
| observation.state            | float32 (S_max,)     | normalized, zero-padded                                 |
| state_mask                   | bool (S_max,)        | real state dimensions                                   |
| action                       | float32 (H, A_max)   | normalized chunk of H steps, zero-padded dimensions      |
| action_mask                  | bool (A_max,)        | real action dimensions                                  |
| action_is_pad                | bool (H,)            | steps past the episode end: the robot's hold_action      |
|                              |                      | there (lerobot's last action where it has none)          |
| embodiment, task             | str                  |                                                         |
| grounding                    | str                  | the instruction's object and its box at the episode's    |
|                              |                      | start, `<|ref|>the red triangle<|/ref|><|det|>[[..]]<|/det|>` |
|                              |                      | (`episode_targets` of meta/collection.json, which        |
|                              |                      | `vla collect` and `vla annotate` write; "" without)      |
| dataset_index, episode_index, frame_index, index | int64 |                                               |

With `pad=False` tensors keep each dataset's own sizes and only the listed cameras that dataset has appear.
`grounded_only=True` (a policy that grounds first trains on the box) keeps only the episodes with a recorded box; a
dataset with none is an error.

Sampling: one sampler for every training stream, `SourceSchedule`: global position -> (source, item). Source i is
drawn with probability weight_i / sum(weights) and each source takes its items in epochs of its own (a fresh
permutation per pass, so every frame is seen once before any is seen twice); a pure function of the position, so a
run resumes on the next unseen sample and processes shard the stream. `MixtureSampler` (a torch Sampler over flat
mixture indices) and the training stages (`vla train`: robot datasets plus scene VQA; `pretrain`: conversations plus
text) all draw from it. It runs in the main process and DataLoader workers only fetch the indices they are handed,
so workers never duplicate samples.

Datasets of the same embodiment share one normalizer, with stats computed exactly over all their frames
(`stats_source="data"`): a policy has one set of stats per robot, the one it trains with, saves and rolls out with.

A dataset whose `robot_type` is not a registered robot describes its own (`envs.embodiments.embodiment_from_features`:
action and state sizes, cameras, fps from `meta/info.json`; a chunk past an episode's end repeats the last action),
so any LeRobotDataset v3 trains without registering anything; `embodiment={name: ..., hold_action: [...]}` names one
and adds what its features cannot say. Errors name the dataset (and episode, frame and key where it applies):
non-finite actions/states, missing stats, missing requested cameras, shapes that disagree with the embodiment or the
stats, an unknown embodiment name given as an override, datasets of one robot name that disagree on its sizes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbone.checkpoint import is_hub_id
from envs.collect import COLLECTION_FILE, EPISODE_TARGETS, read_collection_record, video_backend
from envs.embodiments import EMBODIMENTS, Embodiment, embodiment_from_features, get_embodiment
from envs.normalize import Normalizer, feature_stats
from envs.scene_language import grounding_answer
from heads.embodiment import camera_name

ACTION = "action"
STATE = "observation.state"


class DataError(ValueError):
    """Bad data in a dataset of the mixture (the message names dataset, episode and key)."""


@dataclass
class DatasetSpec:
    """One member of a mixture: a hub id (`root=None`) or a local dataset (`root`), its sampling weight, and an
    optional embodiment (default: the dataset's `robot_type`): a registered robot's name, or a mapping that names and
    describes a new one (`{name: so100, hold_action: null}`; its sizes, cameras and rate are the dataset's)."""

    repo_id: str
    root: str | None = None
    weight: float = 1.0
    embodiment: str | dict[str, Any] | None = None
    episodes: list[int] | None = None

    @classmethod
    def parse(cls, item: DatasetSpec | str | dict) -> DatasetSpec:
        """A spec from a DatasetSpec, a dict of its fields (`repo_id` may be left out when `root` is given), or a
        string: an existing directory (a local root) or a hub id."""
        if isinstance(item, DatasetSpec):
            return item
        if isinstance(item, dict):
            item = dict(item)
            if "repo_id" not in item and item.get("root"):
                item["repo_id"] = f"local/{Path(item['root']).name}"
            unknown = sorted(set(item) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"unknown dataset spec key(s) {unknown} in {item}")
            return cls(**item)
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if path.is_dir():
                return cls(repo_id=f"local/{path.name}", root=str(path))
            if not is_hub_id(str(item)):
                raise FileNotFoundError(f"{item}: no such dataset folder (and not a hub id, which reads namespace/name)")
            return cls(repo_id=str(item))
        raise TypeError(f"cannot make a DatasetSpec from {item!r}")

    @property
    def label(self) -> str:
        return f"dataset {self.repo_id!r}" + (f" ({self.root})" if self.root else "")


class _Member:
    """One loaded dataset with what the mixture needs to know about it."""

    def __init__(
        self, spec: DatasetSpec, action_horizon: int, action_mode: str, state_mode: str, tolerance_s: float, check_data: bool,
        stats_source: str = "data", in_memory: bool = False, grounded_only: bool = False,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from huggingface_hub.errors import OfflineModeIsEnabled
        from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

        self.spec = spec
        self.label = spec.label
        if spec.root is not None and not (Path(spec.root) / "meta" / "info.json").is_file():
            raise FileNotFoundError(f"{spec.root}: not a LeRobot dataset (no meta/info.json)")
        try:
            meta = LeRobotDatasetMetadata(spec.repo_id, root=spec.root)
        except Exception as error:  # noqa: BLE001 - a hub id the hub could not give (off, unreachable, unknown)
            if spec.root is not None:  # a local folder's own fault: as it is
                raise
            why = ("not in the local Hugging Face cache (HF_HUB_OFFLINE=1: nothing is downloaded)"
                   if isinstance(error, OfflineModeIsEnabled) else
                   f"the Hugging Face hub could not give it ({type(error).__name__}: {' '.join(str(error).split())})")
            raise FileNotFoundError(f"{spec.repo_id}: no such local folder, and {why}") from error
        self.fps = int(meta.fps)
        self.embodiment = self._embodiment(spec, meta)
        features = meta.features
        self.camera_keys = {camera_name(k): k for k in meta.camera_keys}
        self.has_state = STATE in features
        self._check_shape(features, ACTION, self.embodiment.action_dim)
        if self.has_state:
            self._check_shape(features, STATE, self.embodiment.state_dim)
        record = read_collection_record(meta.root) or {}
        self.targets = record.get(EPISODE_TARGETS) or []  # per episode {"ref", "det"} or None (envs.collect)
        episodes, self.left_out = spec.episodes, 0
        if grounded_only:  # only the episodes whose named object's box is recorded
            wanted = spec.episodes or range(meta.total_episodes)
            labelled = [e for e in wanted if e < len(self.targets) and self.targets[e]]
            if not labelled:
                raise DataError(f"{self.label}: records no box of the object each episode's task names "
                                f"({EPISODE_TARGETS} in {COLLECTION_FILE}), which grounding first trains on: `vla "
                                f"collect` records them, `vla annotate` writes them for a dataset made elsewhere")
            self.left_out = len(wanted) - len(labelled)
            episodes = labelled if self.left_out else spec.episodes
        delta = {ACTION: [i / self.fps for i in range(action_horizon)]}
        self.dataset = LeRobotDataset(spec.repo_id, root=spec.root, episodes=episodes, delta_timestamps=delta, tolerance_s=tolerance_s,
                                     video_backend=video_backend())
        if stats_source not in ("data", "meta"):
            raise ValueError(f"stats_source must be 'data' or 'meta', got {stats_source!r}")
        self.action_horizon = action_horizon
        table = self._low_dim_table() if check_data or stats_source == "data" or in_memory else None
        if check_data:  # before the stats: NaN data makes NaN stats, and the data error says where it is
            self.check_finite(table)
        modes = {ACTION: action_mode}
        if self.has_state:
            modes[STATE] = state_mode
        stats = dict(meta.stats or {})
        # the raw values the stats come from, kept until the mixture has merged the stats of same-robot datasets
        self.stat_values = {key: table[key] for key in modes} if stats_source == "data" else None
        if stats_source == "data":  # exact quantiles (meta/stats.json averages per-episode ones; see envs/normalize.py)
            stats |= {key: feature_stats(table[key]) for key in modes}
        if not stats:
            raise DataError(f"{self.label}: has no stats (meta/stats.json); recompute them with lerobot or use stats_source='data'")
        self.normalizer = Normalizer.from_stats(stats, modes, name=self.label)
        for key in modes:
            stat_shape = self.normalizer.shapes.get(key)
            if stat_shape is not None and tuple(stat_shape) != tuple(features[key]["shape"]):
                raise DataError(f"{self.label}: stats of {key!r} have shape {stat_shape}, feature has {tuple(features[key]['shape'])}")
        # image-column datasets are read whole into memory (`memory_item`); video datasets decode per item
        self.memory = self._read_into_memory(table) if in_memory and not meta.video_keys else None

    def grounding(self, episode: int) -> str:
        """The grounding answer of the object episode `episode`'s instruction names ("" when not recorded)."""
        target = self.targets[episode] if 0 <= episode < len(self.targets) else None
        return grounding_answer(target["ref"], target["det"]) if target else ""

    def _embodiment(self, spec: DatasetSpec, meta) -> Embodiment:
        """The robot of this dataset: `spec.embodiment` as a name is a registered robot (a typo is an error); as a
        mapping it describes a new one (`{name: ..., hold_action: [...]}`), the rest from the dataset's features;
        without it, the dataset's `robot_type`, registered or else described by the dataset itself."""
        known = ", ".join(sorted(EMBODIMENTS))
        if isinstance(spec.embodiment, str):
            try:
                return get_embodiment(spec.embodiment)
            except KeyError:
                raise DataError(
                    f"{self.label}: unknown embodiment {spec.embodiment!r}; known embodiments: {known} (or describe a "
                    f"new robot: embodiment={{name: {spec.embodiment}}}, envs.register_embodiment(...))") from None
        described = dict(spec.embodiment or {})
        described.setdefault("name", meta.robot_type)
        if not described["name"]:
            raise DataError(f"{self.label}: no robot_type in meta/info.json; pass embodiment=NAME (known: {known}) "
                            f"or embodiment={{name: NAME}} to describe a new robot from this dataset")
        if spec.embodiment is None and described["name"] in EMBODIMENTS:
            return EMBODIMENTS[described["name"]]
        if described["name"] in EMBODIMENTS:
            raise DataError(f"{self.label}: embodiment {described['name']!r} is a registered robot; pass "
                            f"embodiment={described['name']} to use it, or describe a new one under another name")
        described.setdefault("description", f"described by {self.label}'s meta/info.json")
        try:
            return embodiment_from_features(meta.features, meta.fps, described)
        except ValueError as error:
            raise DataError(f"{self.label}: {error}") from None

    def _check_shape(self, features: dict, key: str, size: int) -> None:
        if key not in features:
            raise DataError(f"{self.label}: no {key!r} feature; features: {sorted(features)}")
        shape = tuple(features[key]["shape"])
        if shape != (size,):
            raise DataError(f"{self.label}: {key!r} has shape {shape} but embodiment {self.embodiment.name!r} expects ({size},)")

    def _low_dim_table(self) -> dict[str, np.ndarray]:
        """Actions and states (N, D) float32, episode / frame / global / task indices (N,) int64 of every frame."""
        keys = [ACTION] + ([STATE] if self.has_state else [])
        index_keys = ["episode_index", "frame_index", "index", "task_index"]
        raw = self.dataset.hf_dataset.select_columns(keys + index_keys).with_format("numpy")[:]
        return {key: np.stack(raw[key]).astype(np.float32) for key in keys} | {
            key: np.asarray(raw[key], dtype=np.int64) for key in index_keys}

    def _read_into_memory(self, table: dict[str, Any]) -> dict[str, Any]:
        """Every row at once: low-dim columns as arrays, camera frames as uint8 (N, H, W, 3), and each row's episode
        bounds (rows of an episode are contiguous in a LeRobotDataset), for `memory_item`."""
        hf = self.dataset.hf_dataset
        memory = dict(table)
        for key in self.camera_keys.values():
            frames = hf.select_columns([key]).with_format("numpy")[:][key]
            if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4):
                raise DataError(f"{self.label}: camera {key!r} does not decode to uint8 (N, H, W, 3) frames")
            memory[key] = frames
        episodes = memory["episode_index"]
        starts = np.flatnonzero(np.r_[True, episodes[1:] != episodes[:-1]])
        ends = np.r_[starts[1:], len(episodes)]
        run = np.repeat(np.arange(len(starts)), ends - starts)
        memory["episode_start"], memory["episode_end"] = starts[run], ends[run]
        memory["tasks"] = list(self.dataset.meta.tasks.index)
        return memory

    def memory_item(self, local: int) -> dict[str, Any]:
        """Row `local` as `LeRobotDataset.__getitem__` gives it for the keys the mixture reads: the action chunk of
        `action_horizon` steps clamped to the episode with `action_is_pad` past its end, frames as float in [0, 1]."""
        m = self.memory
        start, end = int(m["episode_start"][local]), int(m["episode_end"][local])
        wanted = local + np.arange(self.action_horizon)
        item: dict[str, Any] = {
            ACTION: torch.from_numpy(m[ACTION][np.clip(wanted, start, end - 1)]),
            f"{ACTION}_is_pad": torch.from_numpy((wanted < start) | (wanted >= end)),
            "task": m["tasks"][int(m["task_index"][local])],
        }
        if self.has_state:
            item[STATE] = torch.from_numpy(m[STATE][local].copy())
        for key in ("episode_index", "frame_index", "index"):
            item[key] = torch.tensor(int(m[key][local]))
        for key in self.camera_keys.values():
            item[key] = torch.from_numpy(m[key][local]).permute(2, 0, 1).float().div(255)
        return item

    def check_finite(self, table: dict[str, Any] | None = None) -> None:
        """Scan actions and states; the first non-finite value is reported with its episode and frame."""
        keys = [ACTION] + ([STATE] if self.has_state else [])
        table = self._low_dim_table() if table is None else table
        for key in keys:
            values = np.asarray(table[key], dtype=np.float64)
            bad = ~np.isfinite(values).reshape(len(values), -1).all(axis=1)
            if bad.any():
                row = int(np.argmax(bad))
                raise DataError(
                    f"{self.label}: non-finite {key!r} {values[row].tolist()} in episode {int(table['episode_index'][row])}, "
                    f"frame {int(table['frame_index'][row])}"
                )

    def __len__(self) -> int:
        return len(self.dataset)


class MixtureDataset(torch.utils.data.Dataset):
    """Map-style dataset over several LeRobotDatasets; flat index = offset of the dataset + index inside it."""

    def __init__(
        self,
        datasets: Sequence[DatasetSpec | str | dict],
        action_horizon: int = 1,
        action_norm: str = "quantile",
        state_norm: str = "quantile",
        cameras: Sequence[str] | None = None,
        image_size: int | None = None,
        pad: bool = True,
        check_data: bool = True,
        tolerance_s: float = 1e-4,
        stats_source: str = "data",
        cache_frames: bool = False,
        grounded_only: bool = False,
    ):
        if not datasets:
            raise ValueError("a mixture needs at least one dataset")
        if action_horizon < 1:
            raise ValueError(f"action_horizon must be >= 1, got {action_horizon}")
        self.specs = [DatasetSpec.parse(d) for d in datasets]
        self.action_horizon = int(action_horizon)
        self.image_size = image_size
        self.pad = pad
        self.members = [_Member(s, self.action_horizon, action_norm, state_norm, tolerance_s, check_data, stats_source,
                                in_memory=cache_frames, grounded_only=grounded_only) for s in self.specs]
        if cameras is None:
            self.cameras = sorted({c for m in self.members for c in m.camera_keys})
        else:
            self.cameras = list(cameras)
            for member in self.members:
                missing = [c for c in self.cameras if c not in member.camera_keys]
                if missing:
                    raise DataError(f"{member.label}: missing camera(s) {missing}; it has {sorted(member.camera_keys)}")
        self.max_action_dim = max(m.embodiment.action_dim for m in self.members)
        self.max_state_dim = max(m.embodiment.state_dim for m in self.members)
        self._check_image_sizes()
        self._share_stats_per_embodiment()
        self.offsets = np.cumsum([0] + [len(m) for m in self.members])
        # decoded frames kept in memory as uint8 (exact: they were uint8 before decoding); per process/worker
        self._frame_cache: dict[tuple[int, int], dict[str, Any]] | None = {} if cache_frames else None

    def _share_stats_per_embodiment(self) -> None:
        """Datasets of one robot get one normalizer, with stats computed over all their frames (exact quantiles): the
        policy keeps one set of stats per robot, so training must normalize every dataset of that robot with it."""
        by_robot: dict[str, list[_Member]] = {}
        for member in self.members:
            by_robot.setdefault(member.embodiment.name, []).append(member)
        for name, group in by_robot.items():
            if len(group) > 1:
                labels = ", ".join(m.label for m in group)
                robots = {(m.embodiment.action_dim, m.embodiment.state_dim, m.embodiment.hold_action) for m in group}
                if len(robots) > 1:  # robots described by their datasets (registered ones are checked per dataset)
                    raise DataError(f"{labels} are all embodiment {name!r} but differ in (action size, state size, "
                                    f"hold_action): {sorted(robots, key=str)}; give one of them another name")
                if any(m.stat_values is None for m in group):
                    raise DataError(f"{labels} are all embodiment {name!r}: their stats merge exactly only from the data "
                                    f"(quantiles cannot be merged from meta/stats.json); use stats_source='data'")
                modes = group[0].normalizer.modes
                if any(m.normalizer.modes != modes for m in group):
                    raise DataError(f"{labels} are all embodiment {name!r} but do not all have {sorted(modes)}")
                stats = {key: feature_stats(np.concatenate([m.stat_values[key] for m in group])) for key in modes}
                shared = Normalizer.from_stats(stats, modes, name=f"embodiment {name!r} ({labels})")
                for member in group:
                    member.normalizer = shared
        for member in self.members:
            member.stat_values = None

    def _check_image_sizes(self) -> None:
        if self.image_size is not None or not self.pad:
            return
        sizes = {}
        for member in self.members:
            for camera, key in member.camera_keys.items():
                shape = tuple(member.dataset.meta.features[key]["shape"])
                sizes.setdefault(shape, []).append(f"{member.label}:{camera}")
        if len(sizes) > 1:
            raise DataError(f"image sizes differ across the mixture ({sizes}); pass image_size=... to resize")

    def _blank_image(self) -> torch.Tensor:
        """Stand-in for a camera a sample lacks (pad=True)."""
        if self.image_size is not None:
            return torch.zeros(3, self.image_size, self.image_size)
        for member in self.members:
            for key in member.camera_keys.values():
                height, width, channels = member.dataset.meta.features[key]["shape"]
                return torch.zeros(channels, height, width)
        return torch.zeros(3, 1, 1)

    # ------------------------------------------------------------------ access
    @property
    def normalizers(self) -> list[Normalizer]:
        return [m.normalizer for m in self.members]

    @property
    def weights(self) -> np.ndarray:
        return np.array([s.weight for s in self.specs], dtype=np.float64)

    @property
    def embodiments(self) -> list[str]:
        return [m.embodiment.name for m in self.members]

    def normalizer_for(self, embodiment: str) -> Normalizer:
        """The normalizer of this embodiment (shared by all its datasets)."""
        for member in self.members:
            if member.embodiment.name == embodiment:
                return member.normalizer
        raise KeyError(f"no dataset of embodiment {embodiment!r} in the mixture; have {sorted(set(self.embodiments))}")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Flat index -> (dataset index, index inside that dataset)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mixture of {len(self)} frames")
        which = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return which, int(index - self.offsets[which])

    def __getitem__(self, index: int) -> dict[str, Any]:
        which, local = self.locate(int(index))
        member = self.members[which]
        item = self._item(which, local)
        where = f"{member.label}, episode {int(item['episode_index'])}, frame {int(item['frame_index'])}"
        action = item[ACTION].reshape(self.action_horizon, -1).float()
        self._check_finite(action, ACTION, where)
        hold = member.embodiment.hold_action
        if hold is not None:  # past the episode's end the robot holds still (lerobot repeats the last action there)
            pad = item[f"{ACTION}_is_pad"].bool()[:, None]
            action = torch.where(pad, torch.tensor(hold, dtype=action.dtype), action)  # not in place: items may be views
        action = member.normalizer.normalize(ACTION, action).float()
        sample: dict[str, Any] = {}
        if member.has_state:
            state = item[STATE].float()
            self._check_finite(state, STATE, where)
            state = member.normalizer.normalize(STATE, state).float()
        else:
            state = torch.zeros(0)
        images = {}
        for camera in self.cameras:
            key = member.camera_keys.get(camera)
            if key is None:
                continue
            image = item[key]
            if image.ndim != 3 or image.shape[0] != 3:
                raise DataError(f"{where}: camera {key!r} has shape {tuple(image.shape)}, expected (3, H, W)")
            images[camera] = self._resize(image.float())
        if self.pad:
            action_dim, state_dim = action.shape[-1], state.shape[-1]
            sample[ACTION] = torch.nn.functional.pad(action, (0, self.max_action_dim - action_dim))
            sample["action_mask"] = torch.arange(self.max_action_dim) < action_dim
            sample[STATE] = torch.nn.functional.pad(state, (0, self.max_state_dim - state_dim))
            sample["state_mask"] = torch.arange(self.max_state_dim) < state_dim
            for camera in self.cameras:
                sample[f"observation.images.{camera}"] = images[camera] if camera in images else self._blank_image()
            sample["camera_mask"] = torch.tensor([camera in images for camera in self.cameras])
        else:
            sample[ACTION] = action
            if member.has_state:
                sample[STATE] = state
            for camera, image in images.items():
                sample[f"observation.images.{camera}"] = image
        sample["action_is_pad"] = item[f"{ACTION}_is_pad"].bool()
        sample["embodiment"] = member.embodiment.name
        sample["task"] = item.get("task", "")
        sample["grounding"] = member.grounding(int(item["episode_index"]))
        sample["dataset_index"] = torch.tensor(which)
        for key in ("episode_index", "frame_index", "index"):
            sample[key] = item[key].long()
        return sample

    def _item(self, which: int, local: int) -> dict[str, Any]:
        """The dataset's item, from the frame cache when `cache_frames` (images stored as uint8, returned as float)."""
        member = self.members[which]
        if member.memory is not None:
            return member.memory_item(local)
        if self._frame_cache is None:
            return member.dataset[local]
        cameras = set(member.camera_keys.values())
        cached = self._frame_cache.get((which, local))
        if cached is None:
            item = member.dataset[local]
            cached = {k: v.mul(255).round().to(torch.uint8) if k in cameras else v for k, v in item.items()}
            self._frame_cache[(which, local)] = cached
        return {k: v.float().div(255) if k in cameras else v for k, v in cached.items()}

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        if self.image_size is None or tuple(image.shape[-2:]) == (self.image_size, self.image_size):
            return image
        resized = torch.nn.functional.interpolate(
            image[None], size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
        )
        return resized[0].clamp(0.0, 1.0)

    @staticmethod
    def _check_finite(value: torch.Tensor, key: str, where: str) -> None:
        if not torch.isfinite(value).all():
            raise DataError(f"{where}: non-finite {key!r}: {value.tolist()}")


class SourceSchedule:
    """The one sampler of the project: global stream position -> (source, item inside that source).

    Source s is drawn with probability weights[s] / sum(weights) (uniform draws from numpy rng [seed, 104729, block],
    `block` positions at a time); each source takes its items in epochs of its own: its n-th draw is item
    perm_e[n % size] of a fresh permutation per epoch e = n // size (rng [seed, salts[s], e]), so every item is seen
    once before any is seen twice. A pure function of the position: a run resumes on the next unseen sample, and
    processes that share out the positions together see what one process sees."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int = 0, salts: Sequence[int] | None = None,
                 names: Sequence[str] | None = None, block: int = 4096):
        self.sizes = [int(n) for n in sizes]
        names = list(names) if names is not None else [f"source {i}" for i in range(len(self.sizes))]
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.sizes),) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"need one non-negative weight per source with a positive sum, got {w.tolist()}")
        empty = [i for i, n in enumerate(self.sizes) if n == 0 and w[i] > 0]
        if empty:
            raise DataError(f"{names[empty[0]]}: has no items but a positive sampling weight")
        self.probabilities = w / w.sum()
        self.seed, self.block = seed, block
        self.salts = list(salts) if salts is not None else [10 + i for i in range(len(self.sizes))]
        self._cdf = np.cumsum(self.probabilities)
        self._counts_before = [np.zeros(len(self.sizes), dtype=np.int64)]  # draws per source before block b
        self._block_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation)

    def _choices(self, block: int) -> np.ndarray:
        u = np.random.default_rng([self.seed, 104729, block]).random(self.block)
        return np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self.sizes) - 1)

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source per position, earlier draws of the same source inside the block, draws per source before it)."""
        while len(self._counts_before) <= block:
            b = len(self._counts_before) - 1
            self._counts_before.append(self._counts_before[b] + np.bincount(self._choices(b), minlength=len(self.sizes)))
        if self._block_cache is None or self._block_cache[0] != block:
            choices = self._choices(block)
            onehot = choices[:, None] == np.arange(len(self.sizes))[None]
            rank = (np.cumsum(onehot, axis=0) - onehot)[np.arange(self.block), choices]
            self._block_cache = (block, choices, rank)
        return self._block_cache[1], self._block_cache[2], self._counts_before[block]

    def __call__(self, index: int) -> tuple[int, int]:
        if index < 0:
            raise IndexError(f"stream positions start at 0, got {index}")
        block, pos = divmod(int(index), self.block)
        choices, rank, before = self._block(block)
        source = int(choices[pos])
        draw = int(before[source] + rank[pos])
        size = self.sizes[source]
        epoch = draw // size
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, self.salts[source], epoch]).permutation(size))
            self._perms[source] = cached
        return source, int(cached[1][draw % size])


class MixtureSampler(torch.utils.data.Sampler[int]):
    """Flat mixture indices from `SourceSchedule` (datasets by weight, per-dataset epochs); epoch e of the sampler
    is stream positions [e * num_samples, (e + 1) * num_samples), so `set_epoch` moves on to unseen frames."""

    def __init__(self, mixture: MixtureDataset, num_samples: int | None = None, seed: int = 0, weights: Sequence[float] | None = None):
        self.offsets = mixture.offsets
        self.schedule = SourceSchedule([len(m) for m in mixture.members], mixture.weights if weights is None else weights,
                                       seed, names=[m.label for m in mixture.members])
        self.probabilities = self.schedule.probabilities
        self.num_samples = int(num_samples if num_samples is not None else len(mixture))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.num_samples
        for position in range(start, start + self.num_samples):
            which, local = self.schedule(position)
            yield int(self.offsets[which] + local)


def make_mixture_loader(
    mixture: MixtureDataset,
    batch_size: int,
    seed: int = 0,
    num_samples: int | None = None,
    num_workers: int = 0,
    **loader_kwargs,
) -> torch.utils.data.DataLoader:
    """A DataLoader over the mixture with a `MixtureSampler` (call `loader.sampler.set_epoch(e)` each epoch)."""
    sampler = MixtureSampler(mixture, num_samples=num_samples, seed=seed)
    return torch.utils.data.DataLoader(mixture, batch_size=batch_size, sampler=sampler, num_workers=num_workers, **loader_kwargs)
