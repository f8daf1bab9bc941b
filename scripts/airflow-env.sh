# Sourced by demo.sh and the tests' helpers: a self-contained Airflow home for the
# embedded default (SQLite metadata database, this checkout's dags/ and plugins/).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$root/.airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$root/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$root/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__UNIT_TEST_MODE=False
export PYTHONPATH="$root/include${PYTHONPATH:+:$PYTHONPATH}"
export HEADPOSE_WORKSPACE="${HEADPOSE_WORKSPACE:-$AIRFLOW_HOME/headpose-workspace}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
