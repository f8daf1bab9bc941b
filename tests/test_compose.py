"""docker-compose.yaml is the production topology, and CI's native stack is the same one.

No Docker engine runs here, so these tests read the compose file: the services of
Airflow's official shape are there with health checks and restart policies, every
Airflow container shares the executor, connection, DAG folder and workspace, secrets
come from ``.env``, logins are FAB's (admin, operator, viewer), Flower asks for its own,
every published port is on loopback unless ``.env`` opens it, and
``native_compose.plan`` (what the distributed tests start) runs the same commands with
the same environment, only addresses and paths translated.
"""
from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess

import pytest

import native_compose
from native_compose import (
    INIT_SERVICE, LISTEN_SETTINGS, NATIVE_ONLY_ENV, ROOT, WORKER_SERVICE, NativeLayout, airflow_services,
    command_argv, interpolate, load_compose, mounts, plan, published_ports, service_environment, stack_variables,
)

AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    WORKER_SERVICE}
COMMANDS = {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
            "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
            WORKER_SERVICE: "celery worker"}
AUTH_MANAGER = "headpose_operators.auth.HeadposeAuthManager"
LOGIN_VARIABLES = [f"AIRFLOW_{who}_{part}" for who in ("ADMIN", "OPERATOR", "VIEWER") for part in ("USER", "PASSWORD")]
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
                        "http://127.0.0.1:15000", 15555)


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


def test_dags_plugins_and_include_are_mounted_everywhere_and_no_folder_is_shared_for_hand_off(compose, variables):
    named = set(compose["volumes"])
    for name in [*AIRFLOW_SERVICES, INIT_SERVICE]:
        service = compose["services"][name]
        table = mounts(service)
        env = service_environment(service, variables)
        assert table[native_compose.IMAGE_DEFAULT_PATHS["AIRFLOW__CORE__DAGS_FOLDER"]] == "./dags", name
        assert table[native_compose.IMAGE_DEFAULT_PATHS["AIRFLOW__CORE__PLUGINS_FOLDER"]] == "./plugins", name
        assert table["/opt/airflow/include"] == "./include" and env["PYTHONPATH"] == "/opt/airflow/include"
        # Scratch is each container's own: tasks hand files to each other through the object store.
        assert env["HEADPOSE_WORKSPACE"] not in table and "workspace" not in named, name
        assert table[native_compose.IMAGE_DEFAULT_PATHS["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]] == "airflow-logs"
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
    assert "flower" not in {spec.service for spec in plan(layout, variables, compose=compose)}
    specs = plan(layout, variables, workers=2, compose=compose, profiles=["flower"])
    by_service: dict[str, list] = {}
    for spec in specs:
        by_service.setdefault(spec.service, []).append(spec)
    assert set(by_service) == AIRFLOW_SERVICES | {INIT_SERVICE, "flower"}
    assert [len(by_service[WORKER_SERVICE])] == [2]

    init = by_service[INIT_SERVICE][0]
    assert init.argv == ["/bin/bash", str(ROOT / "scripts" / "airflow-init.sh")]
    for name in AIRFLOW_SERVICES | {"flower"}:
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
            if key in NATIVE_ONLY_ENV:  # a value the native stack sets itself, with its reason
                continue
            assert native == native_compose.translate(value, layout, native_compose.path_map(
                compose["services"][spec.service], layout)), key
            assert not CONTAINER_ADDRESS.search(native) and "/opt/airflow" not in native, (spec.name, key, native)
        extra = set(spec.env) - set(compose_env) - set(variables)
        assert extra <= set(NATIVE_ONLY_ENV), extra - set(NATIVE_ONLY_ENV)
        assert spec.env["AIRFLOW__CORE__DAGS_FOLDER"] == str(ROOT / "dags")
        assert spec.env["AIRFLOW__CORE__PLUGINS_FOLDER"] == str(ROOT / "plugins")
        assert spec.env["PYTHONPATH"] == str(ROOT / "include")
    # A scratch folder of its own for every process, as every container has; one log folder
    # for all, as the named volume is.
    assert len({spec.env["HEADPOSE_WORKSPACE"] for spec in specs}) == len(specs)
    assert len({spec.env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"] for spec in specs}) == 1
    assert len({spec.env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] for spec in workers}) == 2
    # A published service listens natively on the address compose publishes its port on.
    for name, (host, port) in LISTEN_SETTINGS.items():
        spec = by_service[name][0]
        assert spec.env[host] == published_ports(compose["services"][name], variables)[0].host_ip
        assert spec.env[port] == str(layout.listen_port(name))
    assert by_service["flower"][0].healthcheck == ["curl", "--fail", f"http://127.0.0.1:{layout.flower}/healthcheck"]


def test_compose_interpolation_follows_composes_rules():
    assert interpolate("${A:-x} ${B-y} $${HOSTNAME} ${C}", {"A": "", "B": "", "C": "c"}) == "x  ${HOSTNAME} c"
    with pytest.raises(native_compose.StackError, match="set in .env"):
        interpolate("${MISSING:?set in .env}", {})


def test_every_airflow_process_logs_in_through_fab(compose, variables):
    from airflow.api_fastapi.auth.managers.base_auth_manager import BaseAuthManager

    for name in [*AIRFLOW_SERVICES, INIT_SERVICE, "flower"]:
        env = service_environment(compose["services"][name], variables)
        assert env["AIRFLOW__CORE__AUTH_MANAGER"] == AUTH_MANAGER, name
        assert not [key for key in env if "SIMPLE_AUTH_MANAGER" in key], name
    from airflow.providers.fab.auth_manager.fab_auth_manager import FabAuthManager

    import airflow_support  # noqa: F401  (plugins/ on the path, as Airflow puts it for its processes)

    module, _, name = AUTH_MANAGER.rpartition(".")
    manager = getattr(importlib.import_module(module), name)  # plugins/ is on the path of every Airflow process
    assert issubclass(manager, FabAuthManager) and issubclass(manager, BaseAuthManager)


class _User:
    def __init__(self, user_id: int, name: str):
        self.id, self.name = user_id, name

    def get_id(self) -> str:
        return str(self.id)

    def get_name(self) -> str:
        return self.name


def test_an_approver_is_known_by_name_as_well_as_by_fabs_numeric_id():
    import airflow_support  # noqa: F401
    from headpose.planning.release_settings import assigned_users
    from headpose_operators.auth import HeadposeAuthManager

    manager = HeadposeAuthManager.__new__(HeadposeAuthManager)  # the check needs no app or database
    named = {user["id"] for user in assigned_users(["operator"])}
    assert manager.is_authorized_hitl_task(assigned_users=named, user=_User(2, "operator"))
    assert not manager.is_authorized_hitl_task(assigned_users=named, user=_User(1, "admin"))
    assert manager.is_authorized_hitl_task(assigned_users={"1"}, user=_User(1, "admin"))  # FAB's own ids still work


def test_airflow_init_gets_an_admin_an_operator_and_a_viewer_from_env(compose, variables):
    init = compose["services"][INIT_SERVICE]
    env = service_environment(init, variables)
    assert {name: env[name] for name in LOGIN_VARIABLES} == {name: variables[name] for name in LOGIN_VARIABLES}
    for name in LOGIN_VARIABLES:  # compose refuses to start without any of them
        with pytest.raises(native_compose.StackError, match=name):
            service_environment(init, {k: v for k, v in variables.items() if k != name})
    example = native_compose.env_example_names()
    assert len({example[f"AIRFLOW_{who}_USER"] for who in ("ADMIN", "OPERATOR", "VIEWER")}) == 3


@pytest.mark.parametrize("change, message", [
    ({"AIRFLOW_VIEWER_PASSWORD": None}, "AIRFLOW_VIEWER_PASSWORD"),
    ({"AIRFLOW_OPERATOR_USER": ""}, "AIRFLOW_OPERATOR_USER"),
    ({"AIRFLOW_VIEWER_USER": "ops"}, "must name three users"),
])
def test_airflow_init_refuses_missing_or_shared_logins_before_it_touches_anything(tmp_path, change, message):
    env = {"HEADPOSE_S3_BUCKET": "b", "HEADPOSE_WORKSPACE": str(tmp_path / "workspace"),
           "AIRFLOW_ADMIN_USER": "admin", "AIRFLOW_OPERATOR_USER": "ops", "AIRFLOW_VIEWER_USER": "viewer",
           "AIRFLOW_ADMIN_PASSWORD": "a", "AIRFLOW_OPERATOR_PASSWORD": "o", "AIRFLOW_VIEWER_PASSWORD": "v",
           "PATH": str(tmp_path)}  # no airflow, mktemp or python on it: the checks must come first
    env.update(change)
    env = {name: value for name, value in env.items() if value is not None}
    result = subprocess.run(["/bin/bash", str(ROOT / "scripts" / "airflow-init.sh")], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and message in result.stderr, (result.returncode, result.stderr)
    assert not (tmp_path / "workspace").exists()


def test_every_published_port_is_on_loopback_unless_env_opens_it(compose, variables):
    example_text = (ROOT / ".env.example").read_text()
    published = {name: service["ports"] for name, service in compose["services"].items() if service.get("ports")}
    assert set(published) == set(LISTEN_SETTINGS)  # the native stack listens where each one is published
    for name, entries in published.items():
        assert [port.host_ip for port in published_ports(compose["services"][name], variables)] == ["127.0.0.1"]
        for entry in entries:
            bind = re.match(r"\$\{(\w+):-127\.0\.0\.1\}:", entry)
            assert bind, f"{name}: {entry} names no address variable"
            assert bind.group(1) in example_text, f"{bind.group(1)} is not documented in .env.example"
            opened = published_ports(compose["services"][name], {**variables, bind.group(1): "0.0.0.0"})
            assert [port.host_ip for port in opened] == ["0.0.0.0"]


def test_flower_asks_for_the_env_login_and_only_its_health_check_does_not(compose, variables):
    flower = compose["services"]["flower"]
    assert flower["profiles"] == ["flower"]
    env = service_environment(flower, variables)
    assert env["AIRFLOW__CELERY__FLOWER_BASIC_AUTH"] == f"{variables['FLOWER_USER']}:{variables['FLOWER_PASSWORD']}"
    for name in ("FLOWER_USER", "FLOWER_PASSWORD"):
        with pytest.raises(native_compose.StackError, match=name):
            service_environment(flower, {k: v for k, v in variables.items() if k != name})
    # Flower serves /healthcheck without the login (it says only "OK"); its pages ask for it.
    assert flower["healthcheck"]["test"][-1].endswith("/healthcheck")
    # Only flower knows the login; the workers and the API server never see it in config.
    for name in AIRFLOW_SERVICES:
        assert "AIRFLOW__CELERY__FLOWER_BASIC_AUTH" not in service_environment(compose["services"][name], variables)


@pytest.mark.parametrize("opt_in, refused", [
    ({}, True),  # the compose file's default: no profile, no opt-in
    ({"HEADPOSE_ALLOW_DEMO_DEFAULTS": "true"}, False),
    ({"HEADPOSE_RUN_DEFAULTS": '{"backend": "sagemaker"}'}, False),
])
def test_the_stack_refuses_to_start_without_a_profile_unless_env_asks_for_the_demo(
        compose, variables, tmp_path, opt_in, refused):
    # airflow-init's environment as compose gives it (.env without the test stack's own opt-in),
    # with nothing on PATH: the check comes before anything runs, and every service waits for it.
    dotenv = {k: v for k, v in variables.items() if k not in native_compose.TEST_ENV}
    env = {**dotenv, **service_environment(compose["services"][INIT_SERVICE], dotenv), **opt_in,
           "HEADPOSE_WORKSPACE": str(tmp_path / "workspace"), "PATH": str(tmp_path)}
    assert env["HEADPOSE_ALLOW_DEMO_DEFAULTS"] == opt_in.get("HEADPOSE_ALLOW_DEMO_DEFAULTS", "false")
    result = subprocess.run(["/bin/bash", str(ROOT / "scripts" / "airflow-init.sh")], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0  # without airflow on PATH it stops either way
    said = "HEADPOSE_RUN_DEFAULTS (the deployment profile) is not set" in result.stderr
    assert said is refused, result.stderr
    assert ("migrating the metadata database" in result.stdout) is not refused


def test_the_test_stacks_profile_requires_an_approval_from_its_operator(variables):
    from headpose.planning.profile import PROFILE_ENV, load_profile

    settings = load_profile({PROFILE_ENV: variables["HEADPOSE_RUN_DEFAULTS"]}).settings  # a valid profile
    assert settings.release_approval == "required"
    assert settings.approvers == [native_compose.env_example_names()["AIRFLOW_OPERATOR_USER"]]
    assert settings.approval_timeout_seconds == native_compose.TEST_APPROVAL_TIMEOUT_SECONDS
