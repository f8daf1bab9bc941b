"""docker-compose.yaml is the production topology, and CI's native stack is the same one.

No Docker engine runs here, so these tests read the compose file: the services of
Airflow's official shape are there with health checks and restart policies, every
Airflow container shares the executor, connection, DAG folder and workspace, secrets
come from ``.env``, and ``native_compose.plan`` (what the distributed tests start)
runs the same commands with the same environment, only addresses and paths translated.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import native_compose
from native_compose import (
    INIT_SERVICE, NATIVE_ONLY_ENV, ROOT, WORKER_SERVICE, NativeLayout, airflow_services, command_argv,
    interpolate, load_compose, mounts, plan, service_environment, stack_variables,
)

AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    WORKER_SERVICE}
COMMANDS = {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
            "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
            WORKER_SERVICE: "celery worker"}
CONTAINER_ADDRESS = re.compile(r"[/@](postgres|redis|object-store|airflow-apiserver)[:/]")


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def variables() -> dict[str, str]:
    return stack_variables()


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> NativeLayout:
    return NativeLayout(tmp_path_factory.mktemp("stack"), 15432, 16379, 18080, 18974, 18794, [18793, 18795],
                        "http://127.0.0.1:15000")


def _dag_constant(name: str) -> str:
    tree = ast.parse((ROOT / "dags" / "headpose_retraining.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not in the DAG file")


def test_the_services_of_airflows_official_shape_are_there(compose):
    services = compose["services"]
    assert set(airflow_services(compose)) == AIRFLOW_SERVICES
    assert {"postgres", "redis", "object-store", INIT_SERVICE} <= set(services)
    for name in AIRFLOW_SERVICES:
        assert services[name]["command"] == COMMANDS[name]
        assert services[name]["build"] == ".", name  # the Dockerfile's image
    for name in [*AIRFLOW_SERVICES, "postgres", "redis", "object-store"]:
        assert services[name]["restart"] == "always", name
        assert services[name]["healthcheck"]["test"], name
    # Nothing fixes a worker's name or host port, so `--scale airflow-worker=N` works.
    assert not {"container_name", "hostname", "ports"} & set(services[WORKER_SERVICE])
    depends = services[WORKER_SERVICE]["depends_on"]
    assert depends["airflow-apiserver"]["condition"] == "service_healthy"
    for name in AIRFLOW_SERVICES:
        assert services[name]["depends_on"][INIT_SERVICE]["condition"] == "service_completed_successfully"
    assert services[INIT_SERVICE]["depends_on"]["object-store"]["condition"] == "service_healthy"


def test_every_airflow_container_shares_executor_database_broker_and_connection(compose, variables):
    conn_id = _dag_constant("AWS_CONN_ID")
    for name in [*AIRFLOW_SERVICES, INIT_SERVICE]:
        env = service_environment(compose["services"][name], variables)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert "@postgres/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql")
        assert "@redis:6379/" in env["AIRFLOW__CELERY__BROKER_URL"]
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        # The DAG's own connection id, pointed at the object store.
        connection = json.loads(env[f"AIRFLOW_CONN_{conn_id.upper()}"])
        assert connection["conn_type"] == "aws"
        assert connection["extra"]["endpoint_url"] == "http://object-store:9000"
        assert env["HEADPOSE_S3_BUCKET"] == variables["HEADPOSE_S3_BUCKET"]
        # Secrets every process must agree on: task tokens, log reads, encrypted fields.
        for secret in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__FERNET_KEY"):
            assert env[secret], (name, secret)


def test_dags_plugins_include_and_the_workspace_are_mounted_everywhere(compose, variables):
    named = set(compose["volumes"])
    for name in [*AIRFLOW_SERVICES, INIT_SERVICE]:
        service = compose["services"][name]
        table = mounts(service)
        env = service_environment(service, variables)
        assert table[native_compose.IMAGE_DEFAULT_PATHS["AIRFLOW__CORE__DAGS_FOLDER"]] == "./dags", name
        assert table[native_compose.IMAGE_DEFAULT_PATHS["AIRFLOW__CORE__PLUGINS_FOLDER"]] == "./plugins", name
        assert table["/opt/airflow/include"] == "./include" and env["PYTHONPATH"] == "/opt/airflow/include"
        # One named volume, the same on every container, is the workspace the tasks share.
        assert table[env["HEADPOSE_WORKSPACE"]] == "workspace" and "workspace" in named, name
        assert table[native_compose.IMAGE_DEFAULT_PATHS["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]] == "airflow-logs"
        auth_file = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
        assert table[str(Path(auth_file).parent)] == "airflow-auth"
    assert mounts(compose["services"][INIT_SERVICE])["/opt/airflow/scripts/airflow-init.sh"].startswith(
        "./scripts/airflow-init.sh")


def test_secrets_come_from_an_uncommitted_env_file(compose):
    text = (ROOT / "docker-compose.yaml").read_text()
    example = native_compose.env_example_names()
    required = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?\?[^}]*)?\}", text))
    assert required <= set(example), required - set(example)
    # No secret is written into the compose file itself.
    for name in example:
        if "PASSWORD" in name or "SECRET" in name or "KEY" in name:
            assert re.search(rf"\$\{{{name}[:?}}]", text), name
    assert compose["x-airflow-common"]["env_file"][0]["path"] == ".env"
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    with pytest.raises(native_compose.StackError, match="POSTGRES_USER"):
        service_environment(compose["services"]["airflow-scheduler"], {})  # without .env it refuses


def test_the_image_is_the_official_one_plus_the_pinned_requirements():
    dockerfile = (ROOT / "Dockerfile").read_text()
    version = re.search(r"^apache-airflow==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert f"ARG AIRFLOW_VERSION={version}" in dockerfile
    assert "FROM apache/airflow:${AIRFLOW_VERSION}-python3.11" in dockerfile
    assert re.search(r"pip install .*-r \S*requirements.txt\s*\\?\s*-c \S*constraints.txt", dockerfile, re.S)


def test_the_native_stack_runs_the_same_commands_with_the_same_environment(compose, variables, layout):
    specs = plan(layout, variables, workers=2, compose=compose)
    by_service: dict[str, list] = {}
    for spec in specs:
        by_service.setdefault(spec.service, []).append(spec)
    assert set(by_service) == AIRFLOW_SERVICES | {INIT_SERVICE}
    assert [len(by_service[WORKER_SERVICE])] == [2]

    init = by_service[INIT_SERVICE][0]
    assert init.argv == ["/bin/bash", str(ROOT / "scripts" / "airflow-init.sh")]
    for name in AIRFLOW_SERVICES:
        for spec in by_service[name]:
            command = command_argv(compose["services"][name]["command"])
            assert spec.argv[0] == native_compose.AIRFLOW and spec.argv[1:1 + len(command)] == command
            extra = spec.argv[1 + len(command):]
            assert extra == ([] if name != WORKER_SERVICE else
                             ["--celery-hostname", spec.name, "--queues", f"default,{spec.name}"])

    workers = by_service[WORKER_SERVICE]
    assert len({spec.name for spec in workers}) == 2
    for spec in specs:
        compose_env = service_environment(compose["services"][spec.service], variables)
        for key, value in compose_env.items():
            native = spec.env[key]
            assert native == native_compose.translate(value, layout, native_compose.path_map(
                compose["services"][spec.service], layout)), key
            assert not CONTAINER_ADDRESS.search(native) and "/opt/airflow" not in native, (spec.name, key, native)
        extra = set(spec.env) - set(compose_env) - set(variables)
        assert extra <= set(NATIVE_ONLY_ENV), extra - set(NATIVE_ONLY_ENV)
        assert spec.env["AIRFLOW__CORE__DAGS_FOLDER"] == str(ROOT / "dags")
        assert spec.env["AIRFLOW__CORE__PLUGINS_FOLDER"] == str(ROOT / "plugins")
        assert spec.env["PYTHONPATH"] == str(ROOT / "include")
    # One workspace and one log folder for every process, as the named volumes are.
    assert len({spec.env["HEADPOSE_WORKSPACE"] for spec in specs}) == 1
    assert len({spec.env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"] for spec in specs}) == 1
    assert len({spec.env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] for spec in workers}) == 2


def test_compose_interpolation_follows_composes_rules():
    assert interpolate("${A:-x} ${B-y} $${HOSTNAME} ${C}", {"A": "", "B": "", "C": "c"}) == "x  ${HOSTNAME} c"
    with pytest.raises(native_compose.StackError, match="set in .env"):
        interpolate("${MISSING:?set in .env}", {})
