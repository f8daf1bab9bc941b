"""docker-compose.yaml read as the native stack's plan, without starting anything.

CI has no Docker engine, so ``native_stack`` starts the compose file's services as host
processes. This module says what it starts: each Airflow service's command and its
``environment`` (``${VAR}`` filled from ``.env.example``'s names, secrets generated per
stack), container addresses and paths translated to the host's, plus ``NATIVE_ONLY_ENV``:
what a container gets for free (its own ports, hostname and ``AIRFLOW_HOME``).
``tests/test_compose.py`` checks that plan against the compose file.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
BIN = Path(sys.executable).parent
AIRFLOW = str(BIN / "airflow")

IMAGE_AIRFLOW_HOME = "/opt/airflow"
# Paths the official image's configuration defaults to under its AIRFLOW_HOME; the
# compose file mounts the project's folders there and relies on them.
IMAGE_DEFAULT_PATHS = {
    "AIRFLOW__CORE__DAGS_FOLDER": f"{IMAGE_AIRFLOW_HOME}/dags",
    "AIRFLOW__CORE__PLUGINS_FOLDER": f"{IMAGE_AIRFLOW_HOME}/plugins",
    "AIRFLOW__LOGGING__BASE_LOG_FOLDER": f"{IMAGE_AIRFLOW_HOME}/logs",
}
INIT_SERVICE = "airflow-init"
WORKER_SERVICE = "airflow-worker"
DEFAULT_QUEUE = "default"  # Airflow's [operators] default_queue
# The port each service listens on inside its container, as the compose file's URLs use it.
CONTAINER_PORTS = {"postgres": 5432, "redis": 6379, "object-store": 9000, "airflow-apiserver": 8080}
# Ports a container's health check reaches on localhost (scheduler: its health server).
HEALTH_PORTS = {"airflow-apiserver": 8080, "airflow-scheduler": 8974, "flower": 5555}
# The settings a published service's process takes its listen address and port from. A
# container listens everywhere and compose publishes the port on the address ``ports``
# names; natively the process itself listens on that address.
LISTEN_SETTINGS = {
    "airflow-apiserver": ("AIRFLOW__API__HOST", "AIRFLOW__API__PORT"),
    "flower": ("AIRFLOW__CELERY__FLOWER_HOST", "AIRFLOW__CELERY__FLOWER_PORT"),
}
# What native processes set beyond the compose environment, and why each is needed.
NATIVE_ONLY_ENV = {
    "AIRFLOW_HOME": "each container has /opt/airflow; here every stack has its own folder",
    "HEADPOSE_WORKSPACE": "each container's scratch is its own; here every process gets its own folder",
    **{name: "the image's default under its AIRFLOW_HOME, translated" for name in IMAGE_DEFAULT_PATHS},
    "AIRFLOW__API__HOST": "the address the compose file publishes the api-server's port on",
    "AIRFLOW__API__PORT": "8080 may be taken on a shared machine",
    "AIRFLOW__CELERY__FLOWER_HOST": "the address the compose file publishes Flower's port on",
    "AIRFLOW__CELERY__FLOWER_PORT": "5555 may be taken",
    "AIRFLOW__API__WORKERS": "one uvicorn worker: the test machine has 2 cores",
    "AIRFLOW__API__BASE_URL": "the api-server's address here, which approval requests link to",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": "8974 may be taken",
    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": "8794 may be taken",
    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "two workers on one host need two log ports",
    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "processes share one host; each reports its container's name",
    "HEADPOSE_NATIVE_HOSTNAME": "the name that callable returns",
    "HEADPOSE_ALTERNATE_QUEUES": "the tests' cluster policy: consecutive tasks on different workers",
    "PATH": "the virtual environment's airflow, python and celery first",
}
ADDRESS_RE = re.compile(r"(?<=[/@])(%s)(?::(\d+))?(?=[/\"'\s]|$)" % "|".join(map(re.escape, CONTAINER_PORTS)))
VARIABLE_RE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class StackError(RuntimeError):
    """The native stack could not start; the message names the service and its log."""


# -- reading the compose file ----------------------------------------------------------

def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as a dict, YAML anchors and merge keys (``<<``) resolved."""
    return yaml.safe_load(path.read_text())


def env_example_names(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """``.env.example``'s variables and example values, in file order."""
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


# Lines the native stack adds to its .env. The DAG runs @weekly by default; on unpausing,
# the scheduler would start a run of the tutorial's defaults (hours of ResNet-50 on 2 cores).
# The test stack's profile makes every run it starts itself tiny - a run started by new data
# (tests/test_new_data.py) too - and converts two edge formats; it retrains on data, and
# its watcher polls the queue every second instead of every minute. It asks for a release
# approval, as a governed deployment's does, from .env.example's operator only, with a deadline
# short enough for tests/test_approval.py to wait for.
TEST_APPROVER = "operator"
TEST_APPROVAL_TIMEOUT_SECONDS = 60
NEW_DATA_QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/headpose-new-data"  # moto's account
NEW_DATA_FOLDER = "headpose/incoming/"
STACK_PROFILE = {
    "resnet_size": 10, "base_filters": 8, "training_steps": 3, "evaluation_steps": 2, "batch_size": 16,
    "min_accuracy": 0, "min_class_recall": 0, "edge_formats": ["onnx", "openvino_fp32"],
    "retrain_on": "either", "new_data_queue": NEW_DATA_QUEUE,
    "new_data_prefix": f"s3://{env_example_names()['HEADPOSE_S3_BUCKET']}/{NEW_DATA_FOLDER}",
    "release_approval": "required", "approvers": [TEST_APPROVER], "approval_timeout": f"{TEST_APPROVAL_TIMEOUT_SECONDS}s",
    # Channels: publish moves the canary; the fleet view's test promotes it (test_fleet_view).
    "rollout": {"canary_devices": ["stack-cam-1", "stack-cam-2"], "min_canaries": 1, "soak_minutes": 0},
}
TEST_ENV = {"HEADPOSE_SCHEDULE": "none", "HEADPOSE_ROLLOUT_SCHEDULE": "none",
            "HEADPOSE_NEW_DATA_POLL_SECONDS": "1",
            "HEADPOSE_RUN_DEFAULTS": json.dumps(STACK_PROFILE)}


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$`` rules."""
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        present = name in variables and (variables[name] != "" or op in ("-", "?"))
        if present:
            return variables[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise StackError(f"${{{name}}} is required: {arg}")
        return ""
    return VARIABLE_RE.sub(replace, value)


def service_environment(service: dict[str, Any], variables: dict[str, str]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {name: interpolate(str(value), variables) for name, value in environment.items()}


def command_argv(command: str | list[str]) -> list[str]:
    return list(command) if isinstance(command, list) else shlex.split(command)


def airflow_services(compose: dict[str, Any], profiles: Iterable[str] = ()) -> list[str]:
    """Long-running services built from the project's image, not init: those without a
    profile, plus those of the ``profiles`` enabled (``docker compose --profile``)."""
    enabled = set(profiles)
    return [
        name for name, service in compose["services"].items()
        if "build" in service and name != INIT_SERVICE
        and (not service.get("profiles") or enabled & set(service["profiles"]))
    ]


@dataclass(frozen=True)
class PublishedPort:
    host_ip: str       # the host address compose binds; every interface when ``ports`` names none
    host_port: str
    container_port: int


def published_ports(service: dict[str, Any], variables: dict[str, str]) -> list[PublishedPort]:
    """A service's ``ports`` in compose's short syntax (``[IP:][HOST:]CONTAINER``),
    ``${VAR}``s filled in. No IP is every interface; no host port, one Docker picks."""
    table = []
    for entry in service.get("ports", []):
        if not isinstance(entry, (str, int)):
            raise StackError(f"ports entry {entry!r}: only the short syntax is read here")
        parts = interpolate(str(entry), variables).rsplit(":", 2)
        if len(parts) == 1:
            parts = ["", *parts]
        ip, host_port, container = ["0.0.0.0", *parts][-3:]
        table.append(PublishedPort(ip.strip("[]"), host_port, int(container)))
    return table


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """``{container path: source}``; a source is ``./relative`` or a named volume."""
    table = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        table[target] = source
    return table


# -- the native plan -------------------------------------------------------------------

@dataclass
class NativeLayout:
    """Where the native stack keeps things and which ports it uses."""

    base: Path
    postgres: int
    redis: int
    api: int
    scheduler_health: int
    trigger_log: int
    worker_logs: list[int]
    object_store: str  # the S3 endpoint URL
    flower: int

    @property
    def home(self) -> Path:
        return self.base / "home"

    def volume(self, name: str) -> Path:
        return self.base / "volumes" / name

    def scratch(self, process: str) -> Path:
        """One process's own scratch, as each container has its own filesystem."""
        return self.base / "scratch" / process

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api}"

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower}"

    def listen_port(self, service: str) -> int:
        return {"airflow-apiserver": self.api, "flower": self.flower}[service]

    def address(self, service: str) -> str:
        if service == "object-store":
            return self.object_store.split("://", 1)[1]
        port = {"postgres": self.postgres, "redis": self.redis, "airflow-apiserver": self.api}[service]
        return f"127.0.0.1:{port}"

    @classmethod
    def allocate(cls, base: Path, object_store: str, workers: int) -> "NativeLayout":
        from embedded import free_port

        return cls(base, free_port(), free_port(), free_port(), free_port(), free_port(),
                   [free_port() for _ in range(workers)], object_store, free_port())


@dataclass
class ProcessSpec:
    name: str                     # the native process (and its hostname)
    service: str                  # the compose service it stands for
    argv: list[str]
    env: dict[str, str]           # the stack's variables only; the caller's environment is added at start
    healthcheck: list[str] | None = None
    depends_on: dict[str, str] = field(default_factory=dict)  # service -> compose condition


def translate(value: str, layout: NativeLayout, path_map: dict[str, Path]) -> str:
    """A compose value with container addresses and container paths made the host's."""
    def address(match: re.Match) -> str:
        service, port = match.group(1), match.group(2)
        if port and int(port) != CONTAINER_PORTS[service]:
            raise StackError(f"{match.group(0)}: {service} listens on {CONTAINER_PORTS[service]}")
        return layout.address(service)
    value = ADDRESS_RE.sub(address, value)
    for container_path in sorted(path_map, key=len, reverse=True):
        value = re.sub(re.escape(container_path) + r"(?=[/\"'\s:]|$)", str(path_map[container_path]), value)
    return value


def path_map(service: dict[str, Any], layout: NativeLayout) -> dict[str, Path]:
    table: dict[str, Path] = {IMAGE_AIRFLOW_HOME: layout.home}
    for target, source in mounts(service).items():
        table[target] = (ROOT / source).resolve() if source.startswith(".") else layout.volume(source)
    return table


def stack_variables(example: dict[str, str] | None = None) -> dict[str, str]:
    """Values for the compose file's ``${VAR}``s: ``.env.example``'s names, fresh secrets."""
    from cryptography.fernet import Fernet

    variables = {}
    for name, value in (example or env_example_names()).items():
        if name == "AIRFLOW_FERNET_KEY":
            value = Fernet.generate_key().decode()
        elif name == "AIRFLOW_UID":
            value = str(os.getuid())  # what .env.example says to use on Linux
        elif value.startswith("change-me"):
            value = secrets.token_urlsafe(24)
        variables[name] = value
    return {**variables, **TEST_ENV}


def plan(layout: NativeLayout, variables: dict[str, str], workers: int = 2,
         compose: dict[str, Any] | None = None, profiles: Iterable[str] = ()) -> list[ProcessSpec]:
    """The native processes of the compose file's Airflow services, init first; a
    service of one of ``profiles`` only when that profile is enabled."""
    compose = compose or load_compose()
    services = compose["services"]
    specs = []
    init = services[INIT_SERVICE]
    init_paths = path_map(init, layout)
    init_argv = [init["entrypoint"], *command_argv(init["command"])]
    specs.append(ProcessSpec(
        INIT_SERVICE, INIT_SERVICE, [translate(arg, layout, init_paths) for arg in init_argv],
        _native_env(services, INIT_SERVICE, INIT_SERVICE, layout, variables, init_paths), None, _depends_on(init),
    ))
    for name in airflow_services(compose, profiles):
        service = services[name]
        paths = path_map(service, layout)
        copies = workers if name == WORKER_SERVICE else 1
        for index in range(copies):
            hostname = f"{name}-{index + 1}" if name == WORKER_SERVICE else name
            env = _native_env(services, name, hostname, layout, variables, paths)
            argv = [AIRFLOW, *command_argv(service["command"])]
            if name == WORKER_SERVICE:
                env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(layout.worker_logs[index])
                argv += ["--celery-hostname", hostname, "--queues", f"{DEFAULT_QUEUE},{hostname}"]
            specs.append(ProcessSpec(hostname, name, argv, env, _healthcheck(service, name, layout, variables),
                                     _depends_on(service)))
    worker_names = [spec.name for spec in specs if spec.service == WORKER_SERVICE]
    for spec in specs:
        spec.env["HEADPOSE_ALTERNATE_QUEUES"] = ",".join(worker_names)
    return specs


def _native_env(services: dict[str, Any], name: str, hostname: str, layout: NativeLayout,
                variables: dict[str, str], paths: dict[str, Path]) -> dict[str, str]:
    service = services[name]
    # env_file: .env reaches the container whole; the service's own environment wins.
    env = dict(variables) if service.get("env_file") else {}
    env.update({name: translate(value, layout, paths)
                for name, value in service_environment(service, variables).items()})
    env.update({name: translate(value, layout, paths) for name, value in IMAGE_DEFAULT_PATHS.items()})
    env.update({
        "AIRFLOW_HOME": str(layout.home),
        **_listen_env(services["airflow-apiserver"], "airflow-apiserver", layout, variables),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": layout.api_url,
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(layout.scheduler_health),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(layout.trigger_log),
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "airflow_local_settings.native_hostname",
        "HEADPOSE_NATIVE_HOSTNAME": hostname,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
    })
    if name == "flower":
        env.update(_listen_env(service, name, layout, variables))
    if "HEADPOSE_WORKSPACE" in env:
        env["HEADPOSE_WORKSPACE"] = str(layout.scratch(hostname))
    return env


def _listen_env(service: dict[str, Any], name: str, layout: NativeLayout,
                variables: dict[str, str]) -> dict[str, str]:
    """The listen address and port of a published service: its one ``ports`` entry's
    address, the layout's port (the compose file's may be taken here)."""
    ports = published_ports(service, variables)
    if len(ports) != 1:
        raise StackError(f"{name}: expected one published port, found {len(ports)}")
    host, port = LISTEN_SETTINGS[name]
    return {host: ports[0].host_ip, port: str(layout.listen_port(name))}


def _healthcheck(service: dict[str, Any], name: str, layout: NativeLayout,
                 variables: dict[str, str]) -> list[str] | None:
    test = (service.get("healthcheck") or {}).get("test")
    if not test:
        return None
    kind, *rest = test
    argv = ["sh", "-c", rest[0]] if kind == "CMD-SHELL" else rest
    local = {"airflow-apiserver": layout.api, "airflow-scheduler": layout.scheduler_health, "flower": layout.flower}
    result = []
    for arg in argv:
        arg = interpolate(arg, variables)
        if name in HEALTH_PORTS:
            arg = arg.replace(f"localhost:{HEALTH_PORTS[name]}", f"127.0.0.1:{local[name]}")
        result.append(arg)
    return result


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return {name: "service_started" for name in depends}
    return {name: spec.get("condition", "service_started") for name, spec in depends.items()}
