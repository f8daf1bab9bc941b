#!/usr/bin/env bash
# Create .venv (once) and install requirements.txt under constraints.txt.
# Re-running is cheap: the install is skipped while both files are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null || python_bin=python3
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($python_bin --version)"
  "$python_bin" -m venv .venv
fi
stamp=.venv/.requirements.sha256
wanted=$(cat requirements.txt constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "bootstrap: installing requirements (first run takes a few minutes)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check uv==0.13.9
  .venv/bin/python -m uv pip install --quiet --python .venv/bin/python \
    -r requirements.txt -c constraints.txt
  echo "$wanted" > "$stamp"
fi
