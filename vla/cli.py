"""The `vla` command: `vla <command> [positional] [key=value ...] [--flag] [--help]`.

Every command composes `configs/<command>.yaml` with hydra-style overrides. A bare `--flag` is shorthand for
`flag=true`; a positional word fills the command's positional key (e.g. `vla bench moe` sets `name=moe`).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

# command -> (module with `main(cfg) -> int | None`, positional key or None, one-line help)
COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "bench": ("vla.commands.bench", "name", "run a benchmark (moe, decode, ...) and print a table, then one JSON line"),
    "demo": ("vla.commands.demo", None, "the end-to-end demo"),
    "generate": ("vla.commands.generate", None, "greedy/sampled generation from a language-model checkpoint (or a tiny random one)"),
    "vqa": ("vla.commands.vqa", None, "ask a DeepSeek-VL2 or policy checkpoint a question about an image; draw grounding boxes"),
    "collect": ("vla.commands.collect", None, "run a scripted expert and write a LeRobotDataset v3"),
    "annotate": ("vla.commands.annotate", None, "each episode's named object's box for a dataset made elsewhere, from a VL2 checkpoint's grounding"),
    "eval": ("vla.commands.evaluate", None, "roll a policy out in gymnasium vector envs; JSON summary, markdown table, videos"),
    "train": ("vla.train", None, "train a stage: align, pretrain, sft, vla"),
    "merge-lora": ("vla.commands.merge_lora", "checkpoint", "fold a LoRA checkpoint into its base: a full policy folder"),
    "serve": ("vla.serve", None, "serve a policy checkpoint over websockets (openpi's protocol; openpi-client works)"),
}

# what continues a command's stopped run
RESUME_HINTS = {"train": ": the same command with resume=true continues it",
                "demo": ": the same command with demo.resume=true continues it (finished datasets and stages are kept)"}


def _usage() -> str:
    lines = ["usage: vla <command> [positional] [key=value ...] [--help]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[str, list[str], bool]:
    """Split argv into (command, hydra overrides, wants_help)."""
    if not argv or argv[0] in ("-h", "--help"):
        return "", [], True
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"vla: unknown command {command!r}\n\n{_usage()}")
    positional_key = COMMANDS[command][1]
    overrides: list[str] = []
    wants_help = False
    for arg in rest:
        if arg in ("-h", "--help"):
            wants_help = True
        elif arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            overrides.append(f"{key.replace('-', '_')}={value or 'true'}")
        elif "=" in arg:
            overrides.append(arg)
        elif positional_key is not None:
            overrides.append(f"{positional_key}={arg}")
        else:
            raise SystemExit(f"vla {command}: unexpected argument {arg!r} (use key=value)")
    return command, overrides, wants_help


def main(argv: list[str] | None = None) -> int:
    command, overrides, wants_help = parse_args(sys.argv[1:] if argv is None else argv)
    if not command:
        print(_usage())
        return 0
    from omegaconf import OmegaConf

    from vla.config import load_config

    module = importlib.import_module(COMMANDS[command][0])
    try:
        if wants_help:
            usage = sys.modules[module.main.__module__].__doc__  # where main is written (vla.train: its entry)
            text = f"{(usage or COMMANDS[command][2]).strip()}\n\nconfig (override with key=value):\n\n"
            try:
                print(text + OmegaConf.to_yaml(load_config(command, overrides)))
                sys.stdout.flush()
            except BrokenPipeError:  # `vla train --help | head`: the reader has gone, not an error
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        cfg = load_config(command, overrides)
        return int(module.main(cfg) or 0)
    except KeyboardInterrupt as stop:  # Ctrl-C, or a training stage stopped by a signal after its checkpoint
        if os.environ.get("RANK", "0") == "0":  # once under torchrun
            what = str(stop) or "interrupted"
            print(f"vla {command}: {what}{RESUME_HINTS.get(command, '')}", file=sys.stderr)
        return getattr(stop, "exit_code", 128 + signal.SIGINT)
    except Exception as e:
        # Bad input (missing file, corrupt checkpoint, wrong shape, unknown name or config key): one clear line, no
        # traceback. VLA_DEBUG=1 shows the traceback.
        line = one_line_error(e, command, overrides)
        if line is None or os.environ.get("VLA_DEBUG"):
            raise
        print(f"vla {command}: error: {line}", file=sys.stderr)
        return 2


def _keys_near(command: str, key: str, overrides: list[str]) -> list[str]:
    """The config keys beside `key` (a dotted path) in the command's config composed with the groups the overrides
    chose (e.g. stage=vision)."""
    from omegaconf import DictConfig

    from vla.config import load_config

    node = load_config(command, [o for o in overrides if o.partition("=")[0] == "stage"])
    for part in key.split(".")[:-1]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def one_line_error(error: Exception, command: str, overrides: list[str] = ()) -> str | None:
    """The one line a user sees for an error of their input, or None for an error of the program (a bug: the
    traceback is shown). Hydra's config errors list the valid choices; gymnasium's unknown env id gets the built-in
    ids."""
    import gymnasium
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, (HydraException, OmegaConfBaseException)):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        options = next((i for i, line in enumerate(lines) if line.startswith("Available options")), None)
        if options is not None:  # "Could not find 'stage/nope'" + the options, one per line, then the search path
            choices = [line for line in lines[options + 1:] if line.isidentifier() or line.replace("-", "_").isidentifier()]
            choices = choices[:next((i for i, c in enumerate(choices) if c == "Config"), len(choices))]
            return f"{' '.join(lines[:options])}; {lines[options].rstrip(':').lower()}: {', '.join(choices)}"
        if lines and lines[0].startswith("Could not override '"):  # an unknown key: the keys at its level
            key = lines[0].split("'")[1]
            return f"{command}: unknown config key {key!r}; known at that level: {', '.join(_keys_near(command, key, list(overrides)))}"
        return " ".join(lines)
    if isinstance(error, gymnasium.error.Error):
        from envs import BUILTIN_ENVS

        return f"{' '.join(str(error).split())} (built-in envs: {', '.join(BUILTIN_ENVS)})"
    from huggingface_hub.errors import OfflineModeIsEnabled
    from websockets.exceptions import WebSocketException

    if isinstance(error, WebSocketException):  # a `remote:` policy's server refused (e.g. HTTP 401: the api_key)
        return f"{type(error).__name__}: {' '.join(str(error).split())}"
    if isinstance(error, OfflineModeIsEnabled):  # a hub id not in the local cache, with the hub off (HF_HUB_OFFLINE=1)
        return f"{' '.join(str(error).split())} (or give a local folder)"
    if isinstance(error, KeyError) and error.args:  # str(KeyError) quotes its message
        return " ".join(str(error.args[0]).split())
    if isinstance(error, (ValueError, FileNotFoundError, FileExistsError, RuntimeError)):
        return " ".join(str(error).split()) if isinstance(error, ValueError) else str(error)
    return None


if __name__ == "__main__":
    raise SystemExit(main())
