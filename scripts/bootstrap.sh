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
# The stamp also covers how the install is made (bytecode compiled): a change there
# installs again too.
install_options="--compile-bytecode"
wanted=$( (cat requirements.txt constraints.txt; echo "$install_options") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "bootstrap: installing requirements (first run takes a few minutes)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check uv==0.13.9
  # --compile-bytecode: write every package's .pyc now. Machines that set
  # PYTHONDONTWRITEBYTECODE (CI's does) otherwise compile TensorFlow's and Airflow's
  # thousands of modules from source in every process: measured here, importing
  # TensorFlow took 16 s of CPU without them and 5 s with them, Airflow's SDK 14 s and 2 s.
  .venv/bin/python -m uv pip install --quiet --python .venv/bin/python $install_options \
    -r requirements.txt -c constraints.txt
  echo "$wanted" > "$stamp"
fi
