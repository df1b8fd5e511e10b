"""vla: assembles the DeepSeek-VL2 backbone, the action-token head and the data/rollout code into policies, training
stages and a CLI.

Sub-packages by role: `vla.policy` (the VLA model, its checkpoints, LoRA, routing, rollout adapters), `vla.train`
(trainer, stages, trainer checkpoints, logging, FSDP2 loading; `python -m vla.train`), `vla.commands` (the `vla`
commands); `vla.serve` (websocket serving), `vla.cli` (the `vla` command) and `vla.config` (hydra configs) stay here.

Modules that lived directly under `vla/` before 2026-12-02 stay importable under their old names (`vla.trainer`,
`vla.stages`, `vla.lora`, ...): `import vla.stages` gives the module `vla.train.stages` itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED_MODULES = {
    "vla.train_checkpoint": "vla.train.checkpoint",
    "vla.train_logging": "vla.train.log",
    "vla.trainer": "vla.train.trainer",
    "vla.stages": "vla.train.stages",
    "vla.vla_stage": "vla.train.vla_stage",
    "vla.vision_stage": "vla.train.vision_stage",
    "vla.fsdp_load": "vla.train.fsdp_load",
    "vla.checkpoints": "vla.policy.checkpoint",
    "vla.lora": "vla.policy.lora",
    "vla.routing": "vla.policy.routing",
    "vla.env_policy": "vla.policy.env_policy",
    "vla.lerobot_checkpoint": "vla.policy.lerobot_checkpoint",
    "vla.bench": "vla.commands.bench",
    "vla.demo": "vla.commands.demo",
    "vla.generate": "vla.commands.generate",
    "vla.vqa": "vla.commands.vqa",
    "vla.collect": "vla.commands.collect",
    "vla.evaluate": "vla.commands.evaluate",
    "vla.merge_lora": "vla.commands.merge_lora",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module name to the module at its new place (the same object, not a copy)."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec):
        return None  # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module) -> None:
        sys.modules[module.__name__] = importlib.import_module(MOVED_MODULES[module.__name__])


sys.meta_path.append(_MovedModuleFinder())
