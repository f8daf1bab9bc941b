"""The training cluster as SageMaker describes it to every host; standard library only.

SageMaker starts the same program on each host of a job with ``SM_HOSTS`` (every
host, ``["algo-1", "algo-2", ...]``) and ``SM_CURRENT_HOST``; the training toolkit
passes the request's ``sagemaker_*`` hyperparameters that configure no part of the
toolkit itself as ``SM_FRAMEWORK_PARAMS``. When such a hyperparameter,
``MULTI_WORKER_FLAG``, is true, SageMaker's TensorFlow image (its framework module,
``sagemaker_tensorflow_container.training``) writes ``TF_CONFIG`` for
``MultiWorkerMirroredStrategy``: every host a worker at ``<host>:8890``, this one the
worker of its index. Where only the plain toolkit runs (an image without that module),
nothing writes it, and ``tf_config`` builds the same document from ``SM_HOSTS`` and
``SM_CURRENT_HOST``. The local backend writes its own, with loopback addresses.

Read before TensorFlow is imported, so that a cluster that cannot train is refused in
an instant, with its reason in the job's ``FailureReason``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

MULTI_WORKER_FLAG = "sagemaker_multi_worker_mirrored_strategy_enabled"
# The port SageMaker's TensorFlow image gives every worker of MultiWorkerMirroredStrategy.
WORKER_PORT = 8890


class ClusterError(ValueError):
    """The hosts, TF_CONFIG and flags do not describe a cluster this entry point trains on."""


@dataclass(frozen=True)
class Cluster:
    """This job's hosts, which one this is, and the ``TF_CONFIG`` they train under."""

    hosts: tuple[str, ...]
    current_host: str
    tf_config: dict[str, Any] | None  # None: one host, nothing to coordinate

    @property
    def size(self) -> int:
        return len(self.hosts)

    @property
    def worker_index(self) -> int:
        """This host's index among the workers; 0, the chief, writes what the job leaves."""
        return int(self.tf_config["task"]["index"]) if self.tf_config else 0

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0


def from_environment(environ: Mapping[str, str] | None = None) -> Cluster:
    """The cluster this process belongs to, from SageMaker's variables (``ClusterError`` if unusable)."""
    env = os.environ if environ is None else environ
    hosts = tuple(json.loads(env.get("SM_HOSTS", '["algo-1"]')))
    current = env.get("SM_CURRENT_HOST", hosts[0])
    if current not in hosts:
        raise ClusterError(f"SM_CURRENT_HOST={current!r} is not one of SM_HOSTS {list(hosts)}")
    if len(hosts) == 1:
        return Cluster(hosts, current, None)
    given = env.get("TF_CONFIG", "").strip()
    if given:
        return Cluster(hosts, current, _checked(json.loads(given), hosts))
    if not _flag(env):
        raise ClusterError(
            f"{len(hosts)} hosts {list(hosts)}, but the request does not enable {MULTI_WORKER_FLAG}: "
            "each host would train its own unsynchronised copy. Plan the run again (plan_run sets it "
            "for instance_count > 1)."
        )
    return Cluster(hosts, current, tf_config(hosts, current))


def tf_config(hosts: tuple[str, ...] | list[str], current_host: str, port: int = WORKER_PORT) -> dict[str, Any]:
    """``TF_CONFIG`` as SageMaker's TensorFlow image writes it for MultiWorkerMirroredStrategy."""
    return {
        "cluster": {"worker": [f"{host}:{port}" for host in hosts]},
        "environment": "cloud",
        "task": {"type": "worker", "index": list(hosts).index(current_host)},
    }


def _flag(env: Mapping[str, str]) -> bool:
    try:
        framework = json.loads(env.get("SM_FRAMEWORK_PARAMS") or "{}")
    except ValueError:
        return False
    return framework.get(MULTI_WORKER_FLAG) in (True, "true", "True")


def _checked(config: Any, hosts: tuple[str, ...]) -> dict[str, Any]:
    """``config`` if it names one worker per host and this task among them."""
    try:
        workers = config["cluster"]["worker"]
        task = config["task"]
        index = int(task["index"])
    except (KeyError, TypeError, ValueError):
        raise ClusterError(f"TF_CONFIG has no cluster.worker list and task index: {config!r}") from None
    if set(config["cluster"]) - {"worker"} or task.get("type") != "worker":
        # The parameter-server layout SageMaker also writes: not what this entry point trains with.
        raise ClusterError(f"TF_CONFIG must list workers only (MultiWorkerMirroredStrategy), got {config!r}")
    if len(workers) != len(hosts) or not 0 <= index < len(workers):
        raise ClusterError(f"TF_CONFIG lists {len(workers)} workers for {len(hosts)} hosts, task {index}")
    return config
