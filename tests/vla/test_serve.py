"""`vla serve`: a websocket policy server on 127.0.0.1 (real sockets, bounded requests and timeouts).

openpi's own client (`openpi-client` from the package registry, in its own virtual environment because it pins
numpy < 2) round-trips against it; every kind of bad input gets an error reply and the connection keeps working; the
API key; two robots of different embodiments on two connections at once (one batched forward pass);
`vla eval policy=remote:...` equals the in-process checkpoint on the same seeds; the wire format is openpi's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import msgpack
import numpy as np
import pytest
import torch

from helpers import tiny_policy
from envs.embodiments import get_embodiment
from envs.normalize import Normalizer
from envs.rollout import evaluate
from vla.commands import register_env_policies
from vla.policy.env_policy import EnvPolicy
from vla.policy import VLAPolicy
from vla.serve import (PolicyServer, RemoteClient, RemoteError, ServeOptions, ServerThread, Session, packb, unpackb)

KEY = "s3cret"
TOP, WRIST, STATE = "observation.images.top", "observation.images.wrist", "observation.state"
MAX_FRAME = 256 * 1024
OPENPI_CLIENT = "openpi-client==0.1.2"
# openpi-client 0.1.2 imports typing_extensions without declaring it; a robot's computer needs it installed beside
OPENPI_REQUIREMENTS = [OPENPI_CLIENT, "typing_extensions"]
STATS = {
    "point2d": {"action": {"q01": [-0.8, -0.6], "q99": [0.9, 0.7]}, STATE: {"q01": [0.0, 0.0], "q99": [1.0, 1.0]}},
    "arm3": {"action": {"q01": [-1.0, -0.5, -0.2], "q99": [1.0, 0.5, 0.3]},
             STATE: {"q01": [-3.1, -3.1, -3.1, -1.0, -1.0], "q99": [3.1, 3.1, 3.1, 1.0, 1.0]}},
}

register_env_policies()  # policy=checkpoint:DIR and remote:URL in evaluate()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny two-robot policy (random weights) saved with normalizer stats, as training saves it."""
    stats = {name: Normalizer.from_stats(s, {"action": "quantile", STATE: "quantile"}, name=name).to_dict()
             for name, s in STATS.items()}
    policy = tiny_policy([get_embodiment("point2d").with_chunk_len(4), get_embodiment("arm3").with_chunk_len(3)],
                         normalizer_stats=stats)
    path = tmp_path_factory.mktemp("serve") / "policy"
    policy.save(path)
    return path


@pytest.fixture(scope="module")
def policy(checkpoint) -> VLAPolicy:
    return VLAPolicy.load(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint):
    options = ServeOptions(host="127.0.0.1", port=0, api_key=KEY, batch_window_ms=50, max_frame_bytes=MAX_FRAME)
    with ServerThread(PolicyServer(VLAPolicy.load(checkpoint), options, name=str(checkpoint))) as thread:
        yield thread


def client(server, key=KEY) -> RemoteClient:
    return RemoteClient(server.url, api_key=key, timeout_s=30)


def observation(embodiment="point2d", seed=0, size=64) -> dict:
    rng = np.random.default_rng(seed)
    emb = get_embodiment(embodiment)
    obs = {key: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for key in emb.cameras}
    return obs | {STATE: rng.uniform(0, 1, emb.state_dim).astype(np.float32), "prompt": "go to the red square",
                  "embodiment": embodiment}


def in_process_chunk(policy: VLAPolicy, obs: dict) -> np.ndarray:
    """The raw-unit chunk `vla eval policy=checkpoint:DIR` would compute for this observation (EnvPolicy's code)."""
    env_policy = EnvPolicy(policy, obs["embodiment"])
    emb = env_policy.embodiment
    pixels = {k.removeprefix("observation.images."): v[None] for k, v in obs.items() if k.startswith("observation.images.")}
    batch = env_policy.observation_batch({"pixels": pixels, "agent_pos": obs[STATE][None], "task": [obs["prompt"]]})
    chunk = policy.predict_action_chunk(batch)[0, : emb.chunk_len, : emb.action_dim]
    return env_policy.normalizer.unnormalize("action", chunk.double()).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# wire format
# ---------------------------------------------------------------------------------------------------------------------
def test_arrays_travel_as_openpi_encodes_them():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = msgpack.unpackb(packb({"a": array}))  # what an openpi peer sees before its object hook
    assert raw["a"] == {b"__ndarray__": True, b"data": array.tobytes(), b"dtype": "<f4", b"shape": [2, 3]}
    back = unpackb(packb({"a": array, "s": np.float32(1.5), "b": np.zeros(3, ">i4")}))
    assert np.array_equal(back["a"], array) and back["a"].dtype == np.float32 and back["a"].flags.writeable
    assert back["s"] == np.float32(1.5) and back["b"].dtype == np.int32
    with pytest.raises(TypeError):
        packb({"a": np.array([object()])})
    for bad in ({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]},  # object arrays refused
                {b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [2]}):  # wrong byte count
        with pytest.raises(ValueError):
            unpackb(msgpack.packb(bad))


def test_step_mode_session_matches_select_action(policy):
    """`mode=step` keeps VLAPolicy.select_action's queue and temporal ensemble per connection."""
    batch = {TOP: torch.rand(1, 3, 64, 64), STATE: torch.rand(1, 2), "task": ["x"], "embodiment": ["point2d"]}
    for n_action_steps, coeff in ((2, None), (None, 0.3)):
        policy.config.n_action_steps, policy.config.temporal_ensemble_coeff = n_action_steps, coeff
        policy.reset()
        session = Session(policy.config)
        for step in range(5):
            batch[STATE] = torch.rand(1, 2)
            expected = policy.select_action(batch)[0, :2]
            chunk = policy.predict_action_chunk(batch)[0, :4, :2] if session.needs_chunk("step") else None
            assert torch.allclose(session.step(chunk, 4), expected, atol=1e-6), (n_action_steps, coeff, step)
    policy.config.n_action_steps = policy.config.temporal_ensemble_coeff = None


# ---------------------------------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------------------------------
def test_metadata_healthz_and_api_key(server, capsys):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.port}/healthz", timeout=10) as response:
        assert response.status == 200
    from websockets.exceptions import InvalidStatus

    for key in (None, "wrong"):
        with pytest.raises(InvalidStatus, match="401"):
            client(server, key)
    # from the command line, a wrong key or no server is one line
    from vla.cli import main

    url = server.url.replace(f":{server.server.port}", ":1")  # port 1: nothing listens
    for policy_url, options, expected in ((server.url, "policy_options={api_key: wrong}", "InvalidStatus: server "
                                           "rejected WebSocket connection: HTTP 401"),
                                          (url, "policy_options={}", f"{url}: cannot connect")):
        assert main(["eval", f"policy=remote:{policy_url}", "env=vla/PointNav-v0", "episodes=1", "videos=0",
                     options]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("vla eval: error: ") and expected in err, err
    c = client(server)
    meta = c.metadata
    assert meta["embodiments"]["point2d"] == {"cameras": [TOP], "action_dim": 2, "state_dim": 2, "chunk_len": 4, "fps": 10}
    assert meta["embodiments"]["arm3"]["cameras"] == [TOP, WRIST] and meta["image_size"] == 64
    assert meta["policy_config"]["n_bins"] == 256
    c.close()


def test_every_bad_input_gets_an_error_and_the_connection_keeps_working(server, policy, caplog):
    good = observation("point2d")
    expected = in_process_chunk(policy, good)
    c, other = client(server), client(server)

    def without(key):
        return {k: v for k, v in good.items() if k != key}

    cases = [
        (packb(without(STATE)), "missing key 'observation.state'"),
        (packb(without(TOP)), "missing key 'observation.images.top'"),
        (packb(without("prompt")), "missing key 'prompt'"),
        (packb(without("embodiment")), "missing key 'embodiment'"),
        (packb(good | {TOP: np.zeros((64, 64), np.uint8)}), "must have shape (H, W, 3)"),
        (packb(good | {TOP: np.zeros((64, 64, 4), np.uint8)}), "must have shape (H, W, 3)"),
        (packb(good | {TOP: np.zeros((64, 64, 3), np.float32)}), "must have dtype uint8"),
        (packb(good | {"embodiment": "hexapod"}), "unknown embodiment 'hexapod'"),
        (packb(good | {STATE: np.zeros(5, np.float32)}), "must have shape (2,)"),
        (packb(good | {STATE: np.array([np.nan, 0.0], np.float32)}), "NaN"),
        (packb(good | {"mode": "fast"}), "'mode' must be one of"),
        (packb([1, 2, 3]), "a request must be a map"),
        (b"\xc1\x00garbage", "not valid msgpack"),
        (packb({"a": 1}) + b"trailing", "not valid msgpack"),
        ("a text frame", "text frame"),
        (packb(good | {"prompt": "x" * (MAX_FRAME + 10)}), "exceeds max_frame_bytes"),
    ]
    with caplog.at_level(logging.WARNING, logger="vla.serve"):
        for frame, message in cases:
            c.ws.send(frame)
            with pytest.raises(RemoteError, match=message.replace("(", r"\(").replace(")", r"\)")):
                c.receive()
            np.testing.assert_allclose(c.infer(good)["actions"], expected, atol=1e-5)  # same connection still works
        np.testing.assert_allclose(other.infer(good)["actions"], expected, atol=1e-5)  # and every other one
    assert len([r for r in caplog.records if r.name == "vla.serve" and "bad request" in r.getMessage()]) == len(cases)
    c.close()
    other.close()


def test_a_request_that_breaks_the_forward_pass_fails_alone(server, policy):
    """A prompt too long for the model's context fails inside the batched forward pass: the batch is retried one
    request at a time, so the good request that shared it still gets its actions. Frames over 4x the limit close
    only their own connection."""
    bad, good = client(server), client(server)
    bad.send(observation("point2d") | {"prompt": "touch the blue circle " * 90})  # ~2,000 characters, > 512 tokens
    good.send(observation("arm3"))
    with pytest.raises(RemoteError, match="inference failed.*max_position_embeddings"):
        bad.receive()
    np.testing.assert_allclose(good.receive()["actions"], in_process_chunk(policy, observation("arm3")), atol=1e-4)
    np.testing.assert_allclose(bad.infer(observation("point2d"))["actions"],
                               in_process_chunk(policy, observation("point2d")), atol=1e-4)
    from websockets.exceptions import ConnectionClosed

    bad.ws.send(b"\0" * (4 * MAX_FRAME + 1))
    with pytest.raises(ConnectionClosed):
        bad.receive()
    assert good.infer(observation("arm3"))["actions"].shape == (3, 3)
    good.close()


def test_two_embodiments_on_two_connections_at_once(server, policy):
    point, arm = client(server), client(server)
    obs_point, obs_arm = observation("point2d", seed=1), observation("arm3", seed=2)
    point.send(obs_point)
    arm.send(obs_arm)
    reply_point, reply_arm = point.receive(), arm.receive()
    assert reply_point["actions"].shape == (4, 2) and reply_arm["actions"].shape == (3, 3)
    assert reply_point["actions"].dtype == np.float32
    assert reply_point["server_timing"]["batch_size"] == 2 == reply_arm["server_timing"]["batch_size"]  # one forward pass
    np.testing.assert_allclose(reply_point["actions"], in_process_chunk(policy, obs_point), atol=1e-4)
    np.testing.assert_allclose(reply_arm["actions"], in_process_chunk(policy, obs_arm), atol=1e-4)
    # step mode: each connection serves its own queue (4 and 3 steps per chunk)
    for _ in range(2):
        steps_point = [point.infer(obs_point | {"mode": "step"})["server_timing"]["batch_size"] for _ in range(4)]
        assert steps_point[1:] == [0, 0, 0]  # served from this connection's queue, no forward pass
    first = arm.infer(obs_arm | {"mode": "step", "reset": True})["actions"]
    np.testing.assert_allclose(first, in_process_chunk(policy, obs_arm)[:1], atol=1e-4)
    point.close()
    arm.close()


def test_remote_eval_equals_in_process(server, checkpoint):
    common = dict(episodes=3, batch_size=3, seed=1000, image_size=64, videos=0, progress=False)
    envs_ = ["vla/PointNav-v0", "vla/ArmReach-v0"]
    local = evaluate(f"checkpoint:{checkpoint}", envs_, **common)
    remote = evaluate(f"remote:{server.url}", envs_, policy_options={"api_key": KEY}, **common)
    assert len(local["episodes"]) == 6
    for a, b in zip(local["episodes"], remote["episodes"]):
        assert (a["env_id"], a["seed"], a["success"], a["length"]) == (b["env_id"], b["seed"], b["success"], b["length"])
        assert a["sum_reward"] == pytest.approx(b["sum_reward"], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# openpi's own client, from the package registry, in its own virtual environment (numpy < 2)
# ---------------------------------------------------------------------------------------------------------------------
def openpi_client_python() -> Path:
    """The python of a cached venv with openpi-client installed (built once); skips where pip cannot build it."""
    version = OPENPI_CLIENT.split("==")[1]
    root = Path(os.environ.get("DSVLA_OPENPI_VENV", Path.home() / ".cache" / f"dsvla-openpi-client-venv-{version}"))
    python = root / "bin" / "python"
    marker = root / ".complete"
    if marker.is_file() and marker.read_text() == " ".join(OPENPI_REQUIREMENTS) and python.exists():
        return python
    shutil.rmtree(root, ignore_errors=True)  # an older or unfinished build
    building = root.with_name(f"{root.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, capture_output=True, timeout=120)
        subprocess.run([str(building / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *OPENPI_REQUIREMENTS], check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        shutil.rmtree(building, ignore_errors=True)
        detail = (getattr(error, "stderr", None) or str(error)).strip().splitlines()[-3:]
        pytest.skip(f"cannot build a venv with {OPENPI_CLIENT} (needs the package registry): {' | '.join(detail)}")
    (building / ".complete").write_text(" ".join(OPENPI_REQUIREMENTS))
    try:
        building.rename(root)
    except OSError:  # another run finished first
        shutil.rmtree(building, ignore_errors=True)
    return python


OPENPI_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from openpi_client import websocket_client_policy

    policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=int(sys.argv[1]), api_key=sys.argv[2])
    meta = policy.get_server_metadata()
    rng = np.random.default_rng(0)
    obs = {"observation.images.top": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
           "observation.state": np.array([0.25, 0.75], np.float32), "prompt": "go to the red square",
           "embodiment": "point2d"}
    out = policy.infer(obs)
    try:
        policy.infer({"prompt": "no images"})
        error = None
    except RuntimeError as e:
        error = str(e)
    again = policy.infer(obs)
    print(json.dumps({"numpy": np.__version__, "embodiments": sorted(meta["embodiments"]),
                      "actions": out["actions"].tolist(), "dtype": str(out["actions"].dtype),
                      "infer_ms": out["server_timing"]["infer_ms"], "error": error,
                      "again": again["actions"].tolist()}))
""")


def test_openpi_client_round_trip(server, policy):
    python = openpi_client_python()
    done = subprocess.run([str(python), "-c", OPENPI_SCRIPT, str(server.server.port), KEY], capture_output=True,
                          text=True, timeout=60, env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["numpy"].startswith("1.") and result["embodiments"] == ["arm3", "point2d"]
    rng = np.random.default_rng(0)
    obs = {TOP: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), STATE: np.array([0.25, 0.75], np.float32),
           "prompt": "go to the red square", "embodiment": "point2d"}
    assert result["dtype"] == "float32" and result["infer_ms"] > 0
    np.testing.assert_allclose(np.array(result["actions"]), in_process_chunk(policy, obs), atol=1e-4)
    assert "missing key 'embodiment'" in result["error"] or "missing key" in result["error"]
    assert result["again"] == result["actions"]


def test_checkpoint_policies_compile_their_decoding_when_asked(tmp_path):
    """`vla eval policy=checkpoint:DIR policy_options={compile: true}`: a policy that generates gets its decode passes
    compiled (lazily: nothing compiles here); without the option, or for one that decodes in one pass, nothing."""
    import gymnasium as gym

    from envs.policies import PolicyContext, make_policy

    emb = get_embodiment("point2d").with_chunk_len(4)
    stats = {"point2d": Normalizer.from_stats(STATS["point2d"], {"action": "quantile", STATE: "quantile"},
                                              name="point2d").to_dict()}
    for name, config in (("grounded", {"ground_target": True}), ("parallel", {})):
        tiny_policy([emb], normalizer_stats=stats, **config).save(tmp_path / name)
    space = gym.spaces.Box(-1, 1, (2,))
    for name, compile_, compiled in (("grounded", True, True), ("grounded", False, False), ("parallel", True, False)):
        context = PolicyContext("vla/PointNav-v0", emb, space, 1, options={"compile": compile_})
        env_policy = make_policy(f"checkpoint:{tmp_path / name}", context)
        assert ("decoder" in env_policy.policy._compiled) == compiled, (name, compile_)
