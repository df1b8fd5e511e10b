"""LeRobot plugin for the DeepSeek-VL2 action-token VLA (`--policy.type=dsvla`).

lerobot's `register_third_party_plugins()` imports this package (the distribution is named `lerobot_policy_dsvla`),
which registers `DSVLAConfig`; the factory then finds `DSVLAPolicy` in `modeling_dsvla` and
`make_dsvla_pre_post_processors` in `processor_dsvla` by naming convention.
"""

from .configuration_dsvla import DSVLAConfig
from .modeling_dsvla import DSVLAPolicy
from .processor_dsvla import make_dsvla_pre_post_processors, save_policy_for_lerobot

__all__ = ["DSVLAConfig", "DSVLAPolicy", "make_dsvla_pre_post_processors", "save_policy_for_lerobot"]
