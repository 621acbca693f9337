#!/usr/bin/env bash
# Create .venv and install anime_role_detect with its pinned dependency set.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # + test tools and Debian's chromium/chromium-driver for browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision move together (see pyproject.toml); install them first so pip picks the pair.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
if [[ $DEV == 1 ]]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
        || echo "warning: could not install chromium/chromium-driver; browser tests will be skipped" >&2
    else
      echo "warning: chromium/chromium-driver missing (apt-get install chromium chromium-driver); browser tests will be skipped" >&2
    fi
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
echo "setup done: $(.venv/bin/python -c 'import anime_role_detect, torch; print("anime_role_detect", anime_role_detect.__version__, "torch", torch.__version__)')"
