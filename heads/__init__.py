"""heads: action tokenization and the action-token head. Knows action tokens, nothing of environments."""

from heads.action_tokenizer import ActionTokenizer
from heads.embodiment import (
    Embodiment,
    EmbodimentRegistry,
    action_token_strings,
    camera_key,
    embodiment_token,
    state_token_strings,
)

__all__ = [
    "ActionTokenizer",
    "Embodiment",
    "EmbodimentRegistry",
    "action_token_strings",
    "camera_key",
    "embodiment_token",
    "state_token_strings",
]
