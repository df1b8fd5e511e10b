"""The `vla` commands other than `train` and `serve` (vla/cli.py lists them all): each module has `main(cfg)`."""


def register_env_policies() -> None:
    """Make the policy specs of vla's own policies resolve in rollouts (`envs.rollout.evaluate`, `vla eval policy=...`):
    `checkpoint:DIR` (a VLAPolicy checkpoint), `lerobot:DIR` (any LeRobot policy checkpoint), `remote:ws://HOST:PORT`
    (a `vla serve` server). The commands and benchmarks that roll policies out call it; nothing registers on import.
    Idempotent."""
    from envs.rollout import register_policy_factory
    from vla.policy.env_policy import _checkpoint_factory
    from vla.policy.lerobot_checkpoint import PREFIX, _lerobot_factory
    from vla.serve import _remote_factory

    register_policy_factory("checkpoint", _checkpoint_factory, overwrite=True)
    register_policy_factory(PREFIX, _lerobot_factory, overwrite=True)
    register_policy_factory("remote", _remote_factory, overwrite=True)
