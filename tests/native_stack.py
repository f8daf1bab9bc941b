"""docker-compose.yaml's topology as native processes, for machines without a Docker engine.

CI cannot run containers, so this module reads ``docker-compose.yaml`` and starts the
same services on the host: PostgreSQL and Redis from Debian's packages, moto's S3
server in the object store's place, ``scripts/airflow-init.sh`` as airflow-init, then
``airflow <command>`` for each Airflow service, in the order its ``depends_on`` gives,
each checked with its own compose health check. The worker service starts twice.

Everything an Airflow process gets comes from the compose file: its ``environment``
(``${VAR}`` filled from ``.env.example``'s names, secrets generated per stack) with
container addresses and paths translated to the host's, plus ``NATIVE_ONLY_ENV``: what a
container gets for free (its own ports, hostname and ``AIRFLOW_HOME``). ``plan`` computes
all that without starting anything; ``tests/test_compose.py`` checks it.

Run by hand: ``.venv/bin/python tests/native_stack.py`` (as root: PostgreSQL runs as
the ``postgres`` user), then open the printed URL; Ctrl-C stops everything.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
LOCAL_SETTINGS = ROOT / "tests" / "native_config" / "airflow_local_settings.py"
SYSTEM_PACKAGES = ROOT / "scripts" / "system-packages.sh"
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
INFRASTRUCTURE = ("postgres", "redis", "object-store")
INIT_SERVICE = "airflow-init"
WORKER_SERVICE = "airflow-worker"
DEFAULT_QUEUE = "default"  # Airflow's [operators] default_queue
# The port each service listens on inside its container, as the compose file's URLs use it.
CONTAINER_PORTS = {"postgres": 5432, "redis": 6379, "object-store": 9000, "airflow-apiserver": 8080}
# Ports a container's health check reaches on localhost (scheduler: its health server).
HEALTH_PORTS = {"airflow-apiserver": 8080, "airflow-scheduler": 8974}
# What native processes set beyond the compose environment, and why each is needed.
NATIVE_ONLY_ENV = {
    "AIRFLOW_HOME": "each container has /opt/airflow; here every stack has its own folder",
    **{name: "the image's default under its AIRFLOW_HOME, translated" for name in IMAGE_DEFAULT_PATHS},
    "AIRFLOW__API__HOST": "containers listen on their own address; here loopback only",
    "AIRFLOW__API__PORT": "8080 may be taken on a shared machine",
    "AIRFLOW__API__WORKERS": "one uvicorn worker: the test machine has 2 cores",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": "8974 may be taken",
    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": "8794 may be taken",
    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "two workers on one host need two log ports",
    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "processes share one host; each reports its container's name",
    "HEADPOSE_NATIVE_HOSTNAME": "the name that callable returns",
    "HEADPOSE_ALTERNATE_QUEUES": "the tests' cluster policy: consecutive tasks on different workers",
    "PATH": "the virtual environment's airflow, python and celery first",
}
# Lines the native stack adds to its .env. The DAG runs @weekly by default; on unpausing,
# the scheduler would start a run of the tutorial's defaults (hours of ResNet-50 on 2 cores).
TEST_ENV = {"HEADPOSE_SCHEDULE": "none"}
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


def airflow_services(compose: dict[str, Any]) -> list[str]:
    """Long-running services built from the project's image (no profile, not init)."""
    return [
        name for name, service in compose["services"].items()
        if "build" in service and name != INIT_SERVICE and not service.get("profiles")
    ]


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

    @property
    def home(self) -> Path:
        return self.base / "home"

    def volume(self, name: str) -> Path:
        return self.base / "volumes" / name

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api}"

    def address(self, service: str) -> str:
        if service == "object-store":
            return self.object_store.split("://", 1)[1]
        port = {"postgres": self.postgres, "redis": self.redis, "airflow-apiserver": self.api}[service]
        return f"127.0.0.1:{port}"

    @classmethod
    def allocate(cls, base: Path, object_store: str, workers: int) -> "NativeLayout":
        from embedded import free_port

        return cls(base, free_port(), free_port(), free_port(), free_port(), free_port(),
                   [free_port() for _ in range(workers)], object_store)


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
         compose: dict[str, Any] | None = None) -> list[ProcessSpec]:
    """The native processes of the compose file's Airflow services, init first."""
    compose = compose or load_compose()
    services = compose["services"]
    specs = []
    init = services[INIT_SERVICE]
    init_paths = path_map(init, layout)
    init_argv = [init["entrypoint"], *command_argv(init["command"])]
    specs.append(ProcessSpec(
        INIT_SERVICE, INIT_SERVICE, [translate(arg, layout, init_paths) for arg in init_argv],
        _native_env(init, INIT_SERVICE, layout, variables, init_paths), None, _depends_on(init),
    ))
    for name in airflow_services(compose):
        service = services[name]
        paths = path_map(service, layout)
        copies = workers if name == WORKER_SERVICE else 1
        for index in range(copies):
            hostname = f"{name}-{index + 1}" if name == WORKER_SERVICE else name
            env = _native_env(service, hostname, layout, variables, paths)
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


def _native_env(service: dict[str, Any], hostname: str, layout: NativeLayout,
                variables: dict[str, str], paths: dict[str, Path]) -> dict[str, str]:
    # env_file: .env reaches the container whole; the service's own environment wins.
    env = dict(variables) if service.get("env_file") else {}
    env.update({name: translate(value, layout, paths)
                for name, value in service_environment(service, variables).items()})
    env.update({name: translate(value, layout, paths) for name, value in IMAGE_DEFAULT_PATHS.items()})
    env.update({
        "AIRFLOW_HOME": str(layout.home),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(layout.api),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(layout.scheduler_health),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(layout.trigger_log),
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "airflow_local_settings.native_hostname",
        "HEADPOSE_NATIVE_HOSTNAME": hostname,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
    })
    return env


def _healthcheck(service: dict[str, Any], name: str, layout: NativeLayout,
                 variables: dict[str, str]) -> list[str] | None:
    test = (service.get("healthcheck") or {}).get("test")
    if not test:
        return None
    kind, *rest = test
    argv = ["sh", "-c", rest[0]] if kind == "CMD-SHELL" else rest
    local = {"airflow-apiserver": layout.api, "airflow-scheduler": layout.scheduler_health}
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


# -- running it ------------------------------------------------------------------------

def _postgres_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not candidates:
        raise StackError("PostgreSQL is not installed (scripts/system-packages.sh installs it)")
    return candidates[-1].parent


def _as_postgres(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI and the development machines run as root.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@dataclass
class Running:
    name: str
    process: subprocess.Popen
    log: Path


class NativeStack:
    """Starts and stops the whole topology; ``say`` receives progress lines."""

    def __init__(self, base: Path, workers: int = 2, say: Callable[[str], None] = print):
        self.base = base
        self.workers = workers
        self.say = say
        self.variables = stack_variables()
        self.processes: list[Running] = []
        self.layout: NativeLayout | None = None
        self.specs: list[ProcessSpec] = []
        self._pg_data: Path | None = None
        self._moto = None

    # public --------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return self.layout.api_url

    @property
    def admin(self) -> tuple[str, str]:
        return self.variables["AIRFLOW_ADMIN_USER"], self.variables["AIRFLOW_ADMIN_PASSWORD"]

    @property
    def bucket(self) -> str:
        return self.variables["HEADPOSE_S3_BUCKET"]

    @property
    def logs_dir(self) -> Path:
        return self.base / "process-logs"

    def start(self) -> "NativeStack":
        from embedded import EmbeddedS3

        started = time.monotonic()
        subprocess.run(["bash", str(SYSTEM_PACKAGES)], check=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.say("native stack: object store (moto), PostgreSQL, Redis")
        self._moto = EmbeddedS3.start()
        self.layout = NativeLayout.allocate(self.base, self._moto.endpoint, self.workers)
        self.specs = plan(self.layout, self.variables, self.workers)
        (self.layout.home / "config").mkdir(parents=True)
        shutil.copy(LOCAL_SETTINGS, self.layout.home / "config" / LOCAL_SETTINGS.name)
        self._start_postgres()
        self._start_redis()
        self._start_airflow()
        self.say(f"native stack: up in {time.monotonic() - started:.0f}s at {self.api_url}")
        return self

    def stop(self, grace: float = 30) -> None:
        """SIGTERM every process group at once (Celery's warm shutdown, uvicorn's graceful
        exit), SIGKILL what is left after ``grace`` seconds; then the object store."""
        for running in self.processes:
            _kill_group(running.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for running in self.processes:
            try:
                running.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for running in self.processes:
            _kill_group(running.process.pid, signal.SIGKILL)  # and any child left behind
            running.process.wait()
        self.processes.clear()
        if self._moto:
            self._moto.stop()
        if self._pg_data:
            shutil.rmtree(self._pg_data, ignore_errors=True)

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.layout.object_store, region_name="us-east-1",
                            aws_access_key_id=self.variables["OBJECT_STORE_USER"],
                            aws_secret_access_key=self.variables["OBJECT_STORE_PASSWORD"])

    def check_alive(self) -> None:
        for running in self.processes:
            if running.process.poll() is not None:
                raise StackError(f"{running.name} exited with {running.process.returncode}:\n{self.tail(running.name)}")

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.logs_dir / f"{name}.log"
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(text[-lines:])

    # infrastructure ------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Running:
        log = self.logs_dir / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                argv, env=env, cwd=cwd or self.base, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,  # one process group to stop
            )
        running = Running(name, process, log)
        self.processes.append(running)
        return running

    def _start_postgres(self) -> None:
        bin_dir, port = _postgres_bin(), self.layout.postgres
        # Its own folder outside the root-only test tree, owned by the user it runs as.
        self._pg_data = Path(tempfile.mkdtemp(prefix="headpose-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self._pg_data, "postgres", "postgres")
        data, sockets = self._pg_data / "data", self._pg_data
        subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                                     "--auth-local=trust", "--auth-host=scram-sha-256"]),
                       check=True, capture_output=True)
        self._spawn("postgres", _as_postgres([
            str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
            "-c", "listen_addresses=127.0.0.1",
            # A throw-away test database: durability buys nothing and costs the 2 cores time.
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ]))
        _wait(lambda: subprocess.run([str(bin_dir / "pg_isready"), "-h", str(sockets), "-p", str(port)],
                                     capture_output=True).returncode == 0, "postgres", 60, self)
        # The same role and database the postgres image makes from POSTGRES_USER/PASSWORD/DB.
        postgres_env = service_environment(load_compose()["services"]["postgres"], self.variables)
        script = 'CREATE ROLE :"user" LOGIN PASSWORD :\'password\';\nCREATE DATABASE :"db" OWNER :"user";\n'
        subprocess.run(_as_postgres([
            str(bin_dir / "psql"), "-h", str(sockets), "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1",
            "-v", f"user={postgres_env['POSTGRES_USER']}", "-v", f"password={postgres_env['POSTGRES_PASSWORD']}",
            "-v", f"db={postgres_env['POSTGRES_DB']}", "-f", "-",
        ]), input=script.encode(), check=True, capture_output=True)

    def _start_redis(self) -> None:
        import redis

        service = load_compose()["services"]["redis"]
        argv = [interpolate(arg, self.variables) for arg in command_argv(service["command"])]
        argv[0] = shutil.which(argv[0]) or argv[0]
        directory = self.base / "redis"
        directory.mkdir()
        self._spawn("redis", [*argv, "--port", str(self.layout.redis), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(directory)])
        client = redis.Redis(port=self.layout.redis, password=self.variables["REDIS_PASSWORD"])

        def ready() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False
        _wait(ready, "redis", 30, self)

    # airflow -------------------------------------------------------------------------
    def _start_airflow(self) -> None:
        base_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AIRFLOW", "AWS_", "PYTHONPATH", "HEADPOSE_"))}
        healthy = set(INFRASTRUCTURE)
        completed: set[str] = set()
        pending = list(self.specs)
        launched: list[tuple[ProcessSpec, Running]] = []
        deadline = time.monotonic() + 900
        while pending or any(spec.service not in healthy for spec, _ in launched):
            for spec in list(pending):
                if all(_satisfied(cond, dep, healthy, completed, launched) for dep, cond in spec.depends_on.items()):
                    pending.remove(spec)
                    self.say(f"native stack: starting {spec.name}: {' '.join(spec.argv[1:])}")
                    running = self._spawn(spec.name, spec.argv, {**base_env, **spec.env}, cwd=ROOT)
                    if spec.service == INIT_SERVICE:
                        if running.process.wait(timeout=900) != 0:
                            raise StackError(f"{INIT_SERVICE} failed:\n{self.tail(spec.name)}")
                        self.processes.remove(running)
                        completed.add(INIT_SERVICE)
                    else:
                        launched.append((spec, running))
            for spec, running in launched:
                if running.process.poll() is not None:
                    raise StackError(f"{spec.name} exited with {running.process.returncode}:\n{self.tail(spec.name)}")
            waiting = [spec for spec, _ in launched if spec.service not in healthy]
            passed = self._health_checks(waiting, base_env)
            for service in {spec.service for spec in waiting}:
                copies = [spec for spec in waiting if spec.service == service]
                if all(passed[spec.name] for spec in copies):
                    healthy.add(service)
                    self.say(f"native stack: {service} healthy ({len(copies)} process(es))")
            if time.monotonic() > deadline:
                raise StackError(f"not healthy in time; pending {[s.name for s in pending]}")
            time.sleep(2)

    def _health_checks(self, specs: list[ProcessSpec], base_env: dict[str, str]) -> dict[str, bool]:
        """Each process's compose health check, all at once (most start a Python process)."""
        checks = {}
        for spec in specs:
            if spec.healthcheck is not None:
                # A container's health check sees its own hostname in $HOSTNAME.
                env = {**base_env, **spec.env, "HOSTNAME": spec.name}
                checks[spec.name] = subprocess.Popen(spec.healthcheck, env=env, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL, start_new_session=True)
        passed = {spec.name: spec.healthcheck is None for spec in specs}
        for name, check in checks.items():
            try:
                passed[name] = check.wait(timeout=120) == 0
            except subprocess.TimeoutExpired:
                _stop(check, grace=0)
        return passed


def _satisfied(condition: str, service: str, healthy: set[str], completed: set[str],
               launched: Iterable[tuple[ProcessSpec, Running]]) -> bool:
    if condition == "service_completed_successfully":
        return service in completed
    if condition == "service_healthy":
        return service in healthy
    return service in healthy or any(spec.service == service for spec, _ in launched)


def _wait(ready: Callable[[], bool], what: str, timeout: float, stack: NativeStack) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        stack.check_alive()
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready in {timeout}s:\n{stack.tail(what)}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the process group (Celery's warm shutdown, uvicorn's graceful exit), then SIGKILL."""
    if process.poll() is not None:
        _kill_group(process.pid, signal.SIGKILL)  # children it may have left behind
        return
    _kill_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(process.pid, signal.SIGKILL)
    process.wait()


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def api_token(api_url: str, username: str, password: str) -> str:
    """A JWT from the auth manager's token endpoint, for ``Authorization: Bearer``."""
    request = urllib.request.Request(
        f"{api_url}/auth/token", data=json.dumps({"username": username, "password": password}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["access_token"]


def main() -> None:
    sys.path[:0] = [str(ROOT / "include"), str(ROOT / "scripts")]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it cleanly, like Ctrl-C
    base = Path(tempfile.mkdtemp(prefix="headpose-stack-"))
    stack = NativeStack(base)
    try:
        stack.start()
        user, password = stack.admin
        print(f"\n{stack.api_url}  user {user}  password {password}\n"
              f"S3 endpoint {stack.layout.object_store}  bucket {stack.bucket}\nCtrl-C stops the stack.")
        while True:
            stack.check_alive()
            time.sleep(5)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
