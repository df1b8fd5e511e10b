"""The lerobot 0.6.1 plugin (lerobot_policy_dsvla): lerobot's factory finds and builds the policy; save -> load keeps
the normalizer stats and the predictions; a VLAPolicy trained by our trainer becomes a checkpoint that lerobot's own
eval loop runs on PushT (in process, and through the `lerobot-eval` command)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from lerobot.configs import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.envs.configs import PushtEnv
from lerobot.policies.factory import get_policy_class, make_policy, make_policy_config, make_pre_post_processors
from lerobot.processor import NormalizerProcessorStep, UnnormalizerProcessorStep

from backbone.tokenizer import build_bpe_tokenizer
from envs.embodiments import get_embodiment
from envs.normalize import Normalizer
from heads.embodiment import EmbodimentRegistry
from lerobot_policy_dsvla import DSVLAConfig, DSVLAPolicy, save_policy_for_lerobot
from vla.policy import VLAPolicyConfig, build_policy

IMAGE, STATE, ACTION = "observation.image", "observation.state", "action"
CHUNK = 4
# made-up PushT stats (raw units: pixels of the 512x512 board)
STATS = {
    ACTION: {"q01": np.array([40.0, 50.0]), "q99": np.array([470.0, 460.0]),
             "min": np.array([0.0, 0.0]), "max": np.array([512.0, 512.0]),
             "mean": np.array([250.0, 240.0]), "std": np.array([100.0, 90.0])},
    STATE: {"q01": np.array([30.0, 45.0]), "q99": np.array([480.0, 470.0]),
            "min": np.array([0.0, 0.0]), "max": np.array([512.0, 512.0]),
            "mean": np.array([255.0, 250.0]), "std": np.array([110.0, 95.0])},
}
FEATURES_IN = {IMAGE: PolicyFeature(type=FeatureType.VISUAL, shape=(3, 96, 96)),
               STATE: PolicyFeature(type=FeatureType.STATE, shape=(2,))}
FEATURES_OUT = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(2,))}


def dsvla_config(**overrides) -> DSVLAConfig:
    kwargs = dict(embodiment="pusht", chunk_size=CHUNK, n_action_steps=CHUNK, tokenizer_vocab_size=300, device="cpu")
    return make_policy_config("dsvla", **(kwargs | overrides))


def raw_observation(seed: int = 0) -> dict:
    """One PushT observation as lerobot's eval loop hands it to the preprocessor (after preprocess_observation)."""
    g = torch.Generator().manual_seed(seed)
    return {IMAGE: torch.rand(1, 3, 96, 96, generator=g), STATE: torch.rand(1, 2, generator=g) * 512,
            "task": ["Push the T-shaped block onto the T-shaped target."]}


def normalizer_step(pipeline, cls):
    return next(step for step in pipeline.steps if isinstance(step, cls))


def run_chunk(policy, preprocessor, postprocessor, observation) -> torch.Tensor:
    """Raw observation -> preprocessor -> normalized chunk -> postprocessor (raw units)."""
    return postprocessor(policy.predict_action_chunk(preprocessor(dict(observation))))


@pytest.fixture(scope="module")
def our_checkpoint(tmp_path_factory) -> tuple[Path, object]:
    """A tiny VLAPolicy as our own trainer makes it (PushT embodiment from envs.embodiments, stats stored as
    Normalizer dicts), turned into a lerobot checkpoint."""
    torch.manual_seed(0)
    emb = get_embodiment("pusht").with_chunk_len(CHUNK)
    assert emb.cameras == (IMAGE,)
    normalizer = Normalizer.from_stats(STATS, {ACTION: "quantile", STATE: "quantile"}, name="pusht")
    vla = build_policy(VLAPolicyConfig(max_chunk_len=8, max_action_dim=4), EmbodimentRegistry([emb]),
                       build_bpe_tokenizer(vocab_size=300), "test", normalizer_stats={"pusht": normalizer.to_dict()})
    vla.eval()
    out = tmp_path_factory.mktemp("ckpt") / "pusht_dsvla"
    save_policy_for_lerobot(vla, out, "pusht")
    return out, vla, normalizer


# ---------------------------------------------------------------------------------------------------------------------
# (a) lerobot's factory finds and builds the policy
# ---------------------------------------------------------------------------------------------------------------------
def test_factory_finds_and_builds_the_policy():
    assert "dsvla" in PreTrainedConfig.get_known_choices()
    assert get_policy_class("dsvla") is DSVLAPolicy
    cfg = dsvla_config(decoding="autoregressive")
    assert isinstance(cfg, DSVLAConfig) and cfg.type == "dsvla" and cfg.push_to_hub is False
    assert cfg.action_delta_indices == list(range(CHUNK)) and cfg.observation_delta_indices is None
    assert cfg.normalization_mapping["ACTION"] is NormalizationMode.QUANTILES
    assert cfg.get_optimizer_preset().lr == cfg.optimizer_lr
    with pytest.raises(ValueError, match="decoding"):
        dsvla_config(decoding="beam")
    with pytest.raises(ValueError, match="n_action_steps"):
        dsvla_config(n_action_steps=CHUNK + 1)

    # fresh policy from an env's features (lerobot-eval / lerobot-train path without a checkpoint)
    cfg = dsvla_config()
    policy = make_policy(cfg, env_cfg=PushtEnv())
    assert isinstance(policy, DSVLAPolicy)
    assert policy.model.registry.get("pusht").cameras == (IMAGE,)
    assert set(cfg.input_features) == {IMAGE, STATE} and set(cfg.output_features) == {ACTION}
    batch = {IMAGE: torch.rand(2, 3, 96, 96), STATE: torch.rand(2, 2) * 2 - 1}  # no task: filled with ""
    assert policy.predict_action_chunk(batch).shape == (2, CHUNK, 2)
    policy.reset()
    assert policy.select_action(batch).shape == (2, 2)
    # training step through the lerobot interface
    batch |= {ACTION: torch.rand(2, CHUNK, 2) * 2 - 1, "action_is_pad": torch.zeros(2, CHUNK, dtype=torch.bool)}
    policy.train()
    loss, metrics = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss) and isinstance(metrics["loss"], float)
    assert len(policy.get_optim_params()) > 0

    bad = dsvla_config(input_features={STATE: FEATURES_IN[STATE]}, output_features=dict(FEATURES_OUT))
    with pytest.raises(ValueError, match="at least one image"):
        bad.validate_features()


# ---------------------------------------------------------------------------------------------------------------------
# (b) save -> load round trip keeps the normalizer stats and the predictions
# ---------------------------------------------------------------------------------------------------------------------
def test_save_load_round_trip_keeps_normalizer_stats(tmp_path):
    torch.manual_seed(1)
    cfg = dsvla_config(input_features=dict(FEATURES_IN), output_features=dict(FEATURES_OUT))
    stats = {k: {s: torch.as_tensor(v, dtype=torch.float32) for s, v in d.items()} for k, d in STATS.items()}
    policy = DSVLAPolicy(cfg, dataset_stats=stats).eval()
    assert set(policy.model.normalizer_stats["pusht"]["stats"]) == {ACTION, STATE}  # kept for our own rollouts too
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    obs = raw_observation()
    expected = run_chunk(policy, pre, post, obs)

    policy.save_pretrained(tmp_path)
    pre.save_pretrained(tmp_path)
    post.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "policy_config.json", "policy_head.safetensors", "backbone", "policy_preprocessor.json",
            "policy_postprocessor.json"} <= names
    assert any(n.startswith("policy_preprocessor_step_") and n.endswith("normalizer_processor.safetensors") for n in names)
    assert json.loads((tmp_path / "config.json").read_text())["type"] == "dsvla"

    loaded_cfg = PreTrainedConfig.from_pretrained(tmp_path)
    loaded_cfg.pretrained_path = tmp_path
    loaded = make_policy(loaded_cfg, env_cfg=PushtEnv())  # the lerobot-eval path (from_pretrained, no ds stats)
    assert isinstance(loaded, DSVLAPolicy) and not loaded.training
    pre2, post2 = make_pre_post_processors(loaded_cfg, pretrained_path=str(tmp_path))
    for pipeline, cls in ((pre2, NormalizerProcessorStep), (post2, UnnormalizerProcessorStep)):
        step = normalizer_step(pipeline, cls)
        for key in (ACTION, STATE) if cls is NormalizerProcessorStep else (ACTION,):
            for stat in ("q01", "q99"):
                np.testing.assert_allclose(np.asarray(step.stats[key][stat]), STATS[key][stat], rtol=1e-6)
        assert step.norm_map[FeatureType.ACTION] is NormalizationMode.QUANTILES
    torch.testing.assert_close(run_chunk(loaded, pre2, post2, obs), expected)

    # a chunk through the whole lerobot path lands in the stats' range around the quantiles
    assert expected.shape == (1, CHUNK, 2)


def test_from_pretrained_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="local checkpoint folders only"):
        DSVLAPolicy.from_pretrained("someone/some-hub-repo")
    with pytest.raises(FileNotFoundError, match="not a dsvla checkpoint"):
        DSVLAPolicy.from_pretrained(tmp_path)


def test_checkpoint_from_our_vla_policy_acts_like_it(our_checkpoint):
    """save_policy_for_lerobot: lerobot's processors + DSVLAPolicy give the same raw actions as our VLAPolicy with our
    own Normalizer (the quantile formulas agree)."""
    path, vla, normalizer = our_checkpoint
    cfg = PreTrainedConfig.from_pretrained(path)
    assert isinstance(cfg, DSVLAConfig) and cfg.embodiment == "pusht" and cfg.chunk_size == CHUNK
    policy = DSVLAPolicy.from_pretrained(path, config=cfg)
    pre, post = make_pre_post_processors(cfg, pretrained_path=str(path))
    obs = raw_observation(3)
    ours_normalized = vla.predict_action_chunk({IMAGE: obs[IMAGE], STATE: normalizer.normalize(STATE, obs[STATE]).float(),
                                                "task": obs["task"], "embodiment": "pusht"})
    ours = normalizer.unnormalize(ACTION, ours_normalized.double()).float()
    torch.testing.assert_close(run_chunk(policy, pre, post, obs), ours, rtol=1e-4, atol=1e-3)

    # inference settings from the command line (--policy.n_action_steps=2) reach the loaded policy
    cfg = PreTrainedConfig.from_pretrained(path, cli_overrides=["--n_action_steps=2"])
    policy = DSVLAPolicy.from_pretrained(path, config=cfg)
    assert policy.model.config.n_action_steps == 2
    batch = pre(dict(obs))
    policy.reset()
    policy.select_action(batch)
    assert len(policy.model._queues[0]) == 1  # 2 served per chunk, one left


# ---------------------------------------------------------------------------------------------------------------------
# (c) lerobot's own eval loop runs a checkpoint of ours
# ---------------------------------------------------------------------------------------------------------------------
def test_lerobot_eval_policy_in_process(our_checkpoint, tmp_path):
    """lerobot_eval.eval_policy_all on a PushT env made by lerobot's make_env (sync, one env, short episodes)."""
    from lerobot.envs.factory import make_env, make_env_pre_post_processors
    from lerobot.envs.utils import close_envs
    from lerobot.scripts.lerobot_eval import eval_policy_all

    path, _, _ = our_checkpoint
    env_cfg = PushtEnv(episode_length=12)
    cfg = PreTrainedConfig.from_pretrained(path)
    cfg.pretrained_path = path
    policy = make_policy(cfg, env_cfg=env_cfg)
    pre, post = make_pre_post_processors(cfg, pretrained_path=str(path))
    env_pre, env_post = make_env_pre_post_processors(env_cfg=env_cfg, policy_cfg=cfg)
    envs = make_env(env_cfg, n_envs=1, use_async_envs=False)
    try:
        with torch.no_grad():
            info = eval_policy_all(envs=envs, policy=policy, env_preprocessor=env_pre, env_postprocessor=env_post,
                                   preprocessor=pre, postprocessor=post, n_episodes=2, max_episodes_rendered=0,
                                   videos_dir=None, start_seed=0)
    finally:
        close_envs(envs)
    overall = info["overall"]
    successes = [s for task in info["per_task"] for s in task["metrics"]["successes"]]
    assert overall["n_episodes"] == len(successes) == 2
    # the percentage is of these episodes, and an untrained policy cannot cover the T in 12 steps
    assert overall["pc_success"] == pytest.approx(100.0 * np.mean(successes)) and overall["pc_success"] == 0.0
    assert np.isfinite(overall["avg_sum_reward"])


def test_lerobot_eval_command_runs_our_checkpoint(our_checkpoint, tmp_path):
    """The real CLI: `lerobot-eval --policy.path=CKPT --env.type=pusht` discovers the plugin (installed distribution
    lerobot_policy_dsvla) and runs 2 short episodes (~15 s here; the full 300-step episodes take ~70 s)."""
    path, _, _ = our_checkpoint
    exe = shutil.which("lerobot-eval", path=str(Path(sys.executable).parent)) or "lerobot-eval"
    out = tmp_path / "eval"
    cmd = [exe, f"--policy.path={path}", "--env.type=pusht", "--env.episode_length=12", "--eval.n_episodes=2",
           "--eval.batch_size=1", "--eval.use_async_envs=false", "--policy.device=cpu", f"--output_dir={out}"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    info = json.loads((out / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 2
