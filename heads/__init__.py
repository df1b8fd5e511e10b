"""heads: action tokenization and the action-token head. Knows action tokens, nothing of environments."""
