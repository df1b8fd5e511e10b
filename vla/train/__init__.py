"""Training: the trainer (`trainer`: optimizer, schedule, accumulation, processes), the stages (`stages`: the
StageTask base class, the DeepSeek-VL2 recipe; `vla_stage`, `vision_stage`), trainer checkpoints (`checkpoint`),
logging (`log`), FSDP2 loading from the meta device (`fsdp_load`), and the `vla train` entry (`entry`;
`python -m vla.train` / `torchrun ... -m vla.train`)."""

from vla.train.entry import configs_from, main, run, stage_config

__all__ = ["configs_from", "main", "run", "stage_config"]
