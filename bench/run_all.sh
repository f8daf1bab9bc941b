#!/usr/bin/env bash
# Run the benchmarks; each writes bench/results/<name>.json (stdout) and
# bench/results/<name>.log (progress). Usage:
#   bench/run_all.sh              the CPU set: parse, input_pipeline, training_memory,
#                                 freeze_inference, edge, e2e
#   bench/run_all.sh --gpu        the CPU set plus gpu_resnet50
#   bench/run_all.sh NAME...      only these (e.g. parse freeze_inference gpu_resnet50)
# A failing benchmark is reported and the others still run; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
export PYTHONPATH="$PWD/include${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

names=(parse input_pipeline training_memory freeze_inference edge e2e)
if [ "${1:-}" = "--gpu" ]; then
  names+=(gpu_resnet50)
  shift
fi
if [ $# -gt 0 ]; then names=("$@"); fi

mkdir -p bench/results
failed=()
for name in "${names[@]}"; do
  script="bench/bench_${name}.py"
  if [ ! -f "$script" ]; then echo "run_all: no $script" >&2; failed+=("$name"); continue; fi
  echo "run_all: $name (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  start=$(date +%s)
  if "$python" "$script" > "bench/results/${name}.json.partial" 2> "bench/results/${name}.log"; then
    mv "bench/results/${name}.json.partial" "bench/results/${name}.json"
    rm -f "bench/results/${name}.failed.json"  # an earlier failure's, now out of date
    echo "run_all: $name done in $(( $(date +%s) - start ))s" >&2
  else
    # Keep what it printed (bench_e2e prints its JSON with the failure) beside the log.
    mv "bench/results/${name}.json.partial" "bench/results/${name}.failed.json"
    echo "run_all: $name FAILED after $(( $(date +%s) - start ))s, see bench/results/${name}.log" >&2
    failed+=("$name")
  fi
done
"$python" - <<'PY' >&2
import json, pathlib
for path in sorted(pathlib.Path("bench/results").glob("*.json")):
    if path.name.endswith(".failed.json"):
        print(f"{path.name[:-len('.failed.json')]:18} FAILED: see its .log")
        continue
    data = json.loads(path.read_text())
    figure = data.get("figure")
    value = data.get(figure) if figure else None
    def short(v):
        if isinstance(v, dict) and "median" in v:
            return f"{v['median']} (n={v['n']}, {v['min']}..{v['max']})"
        if isinstance(v, dict):
            return "; ".join(f"{k}: {short(x)}" for k, x in v.items())
        return v
    value = short(value)
    print(f"{path.stem:18} {figure}: {value}  meets_target={data.get('meets_target', data.get('latency_meets_target'))}")
PY
[ ${#failed[@]} -eq 0 ] || { echo "run_all: failed: ${failed[*]}" >&2; exit 1; }
