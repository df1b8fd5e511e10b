"""`python -m vla.train ...` / `torchrun --nproc-per-node N -m vla.train ...`: one stage, configured by overrides."""

import sys

from vla.config import load_config
from vla.train.entry import main

raise SystemExit(main(load_config("train", sys.argv[1:])))
