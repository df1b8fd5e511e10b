"""Vector envs for rollouts: picklable env factories, default keyword arguments, and envs that cannot run here.

Vector envs
-----------
`make_vector_env` builds `SyncVectorEnv` or `AsyncVectorEnv` (spawn context by default) from `EnvFactory`, a
picklable callable that imports the modules registering the env inside each worker before `gym.make`: `envs` for
`vla/...` ids, the namespace module for `namespace/Name` ids (e.g. `gym_pusht`), plus any `import_modules`. That is
what lerobot-eval's async path lacks (NamespaceNotFound in forkserver workers). As with any spawned multiprocessing,
a script that calls `evaluate(..., asynchronous=True)` needs an `if __name__ == "__main__":` guard. Tasks are read with
`vec_env.call("task")` only from envs that have a `task` attribute (probing a missing attribute kills an async worker).

MuJoCo envs (`gym_aloha/...`; lerobot's MetaWorld and LIBERO wrappers) need MuJoCo rendering: `MUJOCO_GL=egl` with an
EGL device (GPU) or `MUJOCO_GL=osmesa` (slow). Where it is missing they raise `EnvUnavailable` with that message and
`evaluate` skips them (listed under `skipped` in the summary).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from typing import Any

import gymnasium as gym

import envs

MUJOCO_NAMESPACES = ("gym_aloha", "metaworld", "libero")
MUJOCO_HINT = (
    "needs MuJoCo rendering: set MUJOCO_GL=egl on a machine with an EGL device (a GPU), or MUJOCO_GL=osmesa "
    "(software, slow, apt libosmesa6); install with pip install 'lerobot[aloha]' / 'lerobot[metaworld]' / 'lerobot[libero]'"
)
#: gym.make keyword arguments some external envs need to give pixels + agent_pos observations
DEFAULT_ENV_KWARGS: dict[str, dict[str, Any]] = {
    "gym_pusht/PushT-v0": {"obs_type": "pixels_agent_pos"},
    "gym_aloha/AlohaInsertion-v0": {"obs_type": "pixels_agent_pos"},
    "gym_aloha/AlohaTransferCube-v0": {"obs_type": "pixels_agent_pos"},
}


class EnvUnavailable(RuntimeError):
    """The env cannot run here (simulator or renderer missing); the message says what it needs."""


def env_modules(env_id: str) -> list[str]:
    """Modules to import (in every worker) before `gym.make(env_id)`."""
    modules = ["envs"]
    namespace = env_id.split("/")[0] if "/" in env_id else None
    if ":" in env_id:
        modules.append(env_id.split(":")[0])
    elif namespace and namespace != "vla" and importlib.util.find_spec(namespace) is not None:
        modules.append(namespace)
    return modules


class EnvFactory:
    """Picklable `() -> gym.Env` that imports the registering modules first (so spawned workers know the id)."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any] | None = None, import_modules: Sequence[str] = ()):
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        self.import_modules = list(dict.fromkeys([*env_modules(env_id), *import_modules]))

    def __call__(self) -> gym.Env:
        for module in self.import_modules:
            importlib.import_module(module)
        return gym.make(self.env_id, **self.env_kwargs)


def default_env_kwargs(env_id: str, image_size: int | None = None) -> dict[str, Any]:
    kwargs = dict(DEFAULT_ENV_KWARGS.get(env_id, {}))
    if image_size is not None and env_id in envs.BUILTIN_ENVS:
        kwargs["image_size"] = int(image_size)
    return kwargs


def probe_env(env_id: str, env_kwargs: dict[str, Any], import_modules: Sequence[str] = ()) -> gym.Env:
    """Build one env in this process, turning missing simulators/renderers into `EnvUnavailable`."""
    namespace = env_id.split("/")[0]
    try:
        return EnvFactory(env_id, env_kwargs, import_modules)()
    except Exception as error:  # noqa: BLE001 - anything here means "cannot run this env"
        if namespace in MUJOCO_NAMESPACES or "mujoco" in repr(error).lower() or "egl" in repr(error).lower():
            raise EnvUnavailable(f"{env_id}: {MUJOCO_HINT} ({type(error).__name__}: {error})") from error
        if isinstance(error, (gym.error.NamespaceNotFound, gym.error.NameNotFound, ModuleNotFoundError)):
            raise EnvUnavailable(f"{env_id}: not registered/installed ({type(error).__name__}: {error})") from error
        raise


def make_vector_env(
    env_id: str,
    num_envs: int,
    asynchronous: bool = False,
    env_kwargs: dict[str, Any] | None = None,
    import_modules: Sequence[str] = (),
    context: str | None = "spawn",
) -> gym.vector.VectorEnv:
    factories = [EnvFactory(env_id, env_kwargs, import_modules) for _ in range(num_envs)]
    if asynchronous:
        return gym.vector.AsyncVectorEnv(factories, context=context)
    return gym.vector.SyncVectorEnv(factories)
