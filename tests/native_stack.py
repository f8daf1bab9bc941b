"""docker-compose.yaml's topology as native processes, for machines without a Docker engine.

CI cannot run containers, so this module starts the services that ``native_compose.plan``
reads from ``docker-compose.yaml`` on the host: PostgreSQL and Redis from Debian's
packages, moto's S3 server in the object store's place, ``scripts/airflow-init.sh`` as
airflow-init, then ``airflow <command>`` for each Airflow service, in the order its
``depends_on`` gives, each checked with its own compose health check. The worker service
starts twice; a profile's service (Flower) when the caller enables that profile.

Run by hand: ``.venv/bin/python tests/native_stack.py`` (as root: PostgreSQL runs as
the ``postgres`` user), then open the printed URL; Ctrl-C stops everything.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from native_compose import (
    INIT_SERVICE, ROOT, NativeLayout, ProcessSpec, StackError, command_argv, interpolate,
    load_compose, plan, service_environment, stack_variables,
)

LOCAL_SETTINGS = ROOT / "tests" / "native_config" / "airflow_local_settings.py"
SYSTEM_PACKAGES = ROOT / "scripts" / "system-packages.sh"
INFRASTRUCTURE = ("postgres", "redis", "object-store")
# Most health checks start a Python process that imports Airflow or Celery (seconds of CPU
# each): a process is first checked once it has had time to start, then every few seconds.
FIRST_CHECK_AFTER = 12.0
CHECK_EVERY = 4.0


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
    """Starts and stops the whole topology; ``profiles`` adds the services of those
    compose profiles (``["flower"]``); ``say`` receives progress lines."""

    def __init__(self, base: Path, workers: int = 2, profiles: Iterable[str] = (),
                 say: Callable[[str], None] = print):
        self.base = base
        self.workers = workers
        self.profiles = tuple(profiles)
        self.say = say
        self.variables = stack_variables()
        self.processes: list[Running] = []
        self.layout: NativeLayout | None = None
        self.specs: list[ProcessSpec] = []
        self._pg_data: Path | None = None
        self._passed: set[str] = set()  # processes whose health check has passed
        self._moto = None

    # public --------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return self.layout.api_url

    def login(self, who: str) -> tuple[str, str]:
        """``(user, password)`` of ``admin``, ``operator`` or ``viewer`` from the stack's .env."""
        prefix = f"AIRFLOW_{who.upper()}"
        return self.variables[f"{prefix}_USER"], self.variables[f"{prefix}_PASSWORD"]

    @property
    def flower_url(self) -> str:
        return self.layout.flower_url

    @property
    def flower_login(self) -> tuple[str, str]:
        return self.variables["FLOWER_USER"], self.variables["FLOWER_PASSWORD"]

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
        self.specs = plan(self.layout, self.variables, self.workers, profiles=self.profiles)
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
        base_env = caller_env()
        healthy = set(INFRASTRUCTURE)
        completed: set[str] = set()
        pending = list(self.specs)
        launched: list[tuple[ProcessSpec, Running]] = []
        checked_at: dict[str, float] = {}  # a process's first check waits a while, then every few seconds
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
                        checked_at[spec.name] = time.monotonic() + FIRST_CHECK_AFTER - CHECK_EVERY
            for spec, running in launched:
                if running.process.poll() is not None:
                    raise StackError(f"{spec.name} exited with {running.process.returncode}:\n{self.tail(spec.name)}")
            waiting = [spec for spec, _ in launched if spec.service not in healthy]
            due = [spec for spec in waiting if time.monotonic() - checked_at[spec.name] >= CHECK_EVERY]
            passed = self._health_checks(due, base_env)
            for spec in due:
                checked_at[spec.name] = time.monotonic()
                if passed[spec.name]:
                    self._passed.add(spec.name)
            for service in {spec.service for spec in waiting}:
                copies = [spec for spec in waiting if spec.service == service]
                if all(spec.name in self._passed for spec in copies):
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


def caller_env() -> dict[str, str]:
    """This process's environment without what would leak into the stack's configuration."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "PYTHONPATH", "HEADPOSE_"))}


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
    stack = NativeStack(base, profiles=["flower"])
    try:
        stack.start()
        logins = "\n".join(f"  {who:<8} {' / '.join(stack.login(who))}" for who in ("admin", "operator", "viewer"))
        print(f"\n{stack.api_url}\n{logins}\nFlower {stack.flower_url}  {' / '.join(stack.flower_login)}\n"
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
