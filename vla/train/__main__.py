"""`python -m vla.train ...` / `torchrun --nproc-per-node N -m vla.train ...`: one stage, configured by overrides
(`vla train` itself: the same one-line errors, and a stopped run's line on the first process only)."""

import sys

from vla.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
