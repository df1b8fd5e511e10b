#!/usr/bin/env bash
# One entry point for a fresh machine: creates/reuses .venv (Python 3.12), installs the project, then runs.
#   ./run.sh demo [key=value ...]   the main job (vla demo)
#   ./run.sh test [pytest args]     the CPU test suite (what CI runs)
#   ./run.sh vla <command> [...]    any other vla command inside the venv
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
    for cand in "python3.12" "python3"; do
        if PYENV_VERSION=3.12.1 command -v "$cand" >/dev/null 2>&1 &&
           PYENV_VERSION=3.12.1 "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' 2>/dev/null; then
            echo "$cand"; return 0
        fi
    done
    echo "error: Python 3.12 not found (lerobot 0.6.1 needs it); install it or put python3.12 on PATH" >&2
    return 1
}

if [ ! -x .venv/bin/python ]; then
    py=$(find_python)
    PYENV_VERSION=3.12.1 "$py" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --disable-pip-version-check -q -e ".[dev]"
    rm -f .venv/.installed-*; touch "$stamp"
fi

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"   # nothing is downloaded at run time
cmd="${1:-demo}"; shift || true
case "$cmd" in
    demo) exec .venv/bin/vla demo "$@" ;;
    test) exec .venv/bin/python -m pytest -q "$@" ;;
    vla)  exec .venv/bin/vla "$@" ;;
    *) echo "usage: ./run.sh {demo|test|vla} [args]" >&2; exit 2 ;;
esac
