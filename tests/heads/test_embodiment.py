"""Embodiment descriptions, the registry (lookup, order, JSON round trip) and the vocabulary token strings."""

from __future__ import annotations

import json

import pytest

from heads.embodiment import (
    Embodiment,
    EmbodimentRegistry,
    action_token_strings,
    camera_key,
    camera_name,
    embodiment_token,
    state_token_strings,
)


def nav(**overrides) -> Embodiment:
    fields = dict(name="point2d", action_dim=2, state_dim=2, cameras=("observation.images.top",), fps=10, chunk_len=8)
    return Embodiment(**{**fields, **overrides})


def arm(**overrides) -> Embodiment:
    fields = dict(
        name="arm3",
        action_dim=3,
        state_dim=5,
        cameras=["observation.images.top", "observation.images.wrist"],
        fps=20,
        chunk_len=4,
        description="planar arm",
    )
    return Embodiment(**{**fields, **overrides})


def test_embodiment_fields_and_derived_values():
    a = arm()
    assert a.cameras == ("observation.images.top", "observation.images.wrist")  # list -> tuple
    assert a.num_action_tokens == 12 and nav().num_action_tokens == 16  # H * A each, no global padding
    assert a.token == "<|emb:arm3|>"
    assert a.chunk_seconds == pytest.approx(0.2)
    assert nav(cameras=("top", "image")).cameras == ("observation.images.top", "observation.image")  # short -> key
    assert a.camera_names == ("top", "wrist")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(name=""), "embodiment name"),
        (dict(name="bad|name"), "embodiment name"),
        (dict(action_dim=0), "action_dim"),
        (dict(action_dim=2.0), "action_dim"),
        (dict(state_dim=-1), "state_dim"),
        (dict(chunk_len=0), "chunk_len"),
        (dict(fps=0), "fps"),
        (dict(action_names=("vx",)), "1 action names for action_dim 2"),
        (dict(cameras="observation.images.top"), "string"),
        (dict(cameras=("a", "a")), "duplicate"),
        (dict(cameras=("",)), "non-empty"),
    ],
)
def test_embodiment_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        nav(**overrides)


def test_state_dim_zero_and_no_cameras_are_allowed():
    e = nav(state_dim=0, cameras=())
    assert e.state_dim == 0 and e.cameras == ()


def test_registry_lookup_order_and_errors():
    registry = EmbodimentRegistry([nav(), arm()])
    assert registry.names() == ["point2d", "arm3"]
    assert [e.name for e in registry] == ["point2d", "arm3"]
    assert len(registry) == 2 and "arm3" in registry and "aloha" not in registry
    assert registry.get("arm3") is registry["arm3"]
    assert registry.index("arm3") == 1
    assert registry.max_action_tokens == 16
    with pytest.raises(KeyError, match="point2d, arm3"):
        registry.get("aloha")
    registry.register(nav())  # identical: no-op
    with pytest.raises(ValueError, match="already registered"):
        registry.register(nav(chunk_len=4))
    registry.register(nav(chunk_len=4), overwrite=True)
    assert registry.get("point2d").chunk_len == 4
    with pytest.raises(KeyError, match="none registered"):
        EmbodimentRegistry().get("x")


def test_registry_json_round_trip():
    registry = EmbodimentRegistry([arm(), nav()])
    text = json.dumps(registry.to_dict())
    restored = EmbodimentRegistry.from_dict(json.loads(text))
    assert restored == registry and restored.names() == ["arm3", "point2d"]
    assert restored.get("arm3").cameras == arm().cameras
    with pytest.raises(ValueError, match="unknown embodiment fields"):
        Embodiment.from_dict({**nav().to_dict(), "chunk": 3})
    assert Embodiment.from_dict({**nav().to_dict(), "norm_mode": "quantile"}) == nav()  # registries saved before
    with pytest.raises(ValueError, match="embodiments"):
        EmbodimentRegistry.from_dict({})
    held = nav(hold_action=[0, 0])
    assert held.hold_action == (0.0, 0.0) and Embodiment.from_dict(json.loads(json.dumps(held.to_dict()))) == held
    with pytest.raises(ValueError, match="hold_action has 3 values for action_dim 2"):
        nav(hold_action=(0, 0, 0))


def test_token_strings():
    acts = action_token_strings(256)
    assert len(acts) == 256 and acts[0] == "<|act_0|>" and acts[-1] == "<|act_255|>"
    assert state_token_strings(4) == ["<|state_0|>", "<|state_1|>", "<|state_2|>", "<|state_3|>"]
    assert embodiment_token("arm3") == "<|emb:arm3|>"
    with pytest.raises(ValueError):
        action_token_strings(1)
    registry = EmbodimentRegistry([nav(), arm()])
    tokens = registry.special_tokens(n_bins=8)
    assert tokens[:2] == ["<|emb:point2d|>", "<|emb:arm3|>"] and tokens[2:] == action_token_strings(8)
    with_state = registry.special_tokens(n_bins=8, state_tokens=True)
    assert len(with_state) == 2 + 16 and len(set(with_state)) == len(with_state)


def test_the_known_robots_are_this_embodiment_and_the_policy_sets_the_chunk():
    from envs.embodiments import get_embodiment

    libero = get_embodiment("libero")
    assert isinstance(libero, Embodiment) and libero.chunk_len == 1
    e = libero.with_chunk_len(8)
    assert (e.action_dim, e.state_dim, e.chunk_len, e.fps) == (7, 8, 8, 20) and libero.chunk_len == 1
    assert e.cameras == ("observation.images.image", "observation.images.image2")
    assert camera_key("observation.images.top") == "observation.images.top"
    assert [camera_name(k) for k in ("observation.images.top", "observation.image")] == ["top", "image"]
    with pytest.raises(ValueError, match="not a camera key"):
        camera_name("observation.state")
