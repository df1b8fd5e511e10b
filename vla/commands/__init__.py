"""The `vla` commands other than `train` and `serve` (vla/cli.py lists them all): each module has `main(cfg)`."""
