"""Airflow local settings of the native stack (tests/native_stack.py), never of production.

Airflow imports this module from ``$AIRFLOW_HOME/config`` in every process of the stack.

* ``native_hostname``: each process is told the hostname its container would have
  (``HEADPOSE_NATIVE_HOSTNAME``), so that task instances record which worker ran them
  and the compose health checks (``--hostname "$HOSTNAME"``) work unchanged.
* ``task_instance_mutation_hook``: a task cleared after it ran is sent to the next
  queue, so a cleared task runs again on another worker than the first time.
* ``task_policy``: a cluster policy that routes a DAG's tasks round-robin, by their
  depth in the graph, over the queues in ``HEADPOSE_ALTERNATE_QUEUES``. Each native
  worker serves ``default`` plus a queue of its own name, so every hand-over between
  consecutive tasks crosses workers. Celery alone balances a linear DAG by chance only;
  this makes "the run needs the S3 hand-off, Redis and PostgreSQL to succeed" (each
  worker has a scratch folder of its own) a
  certainty rather than a likelihood.
"""
from __future__ import annotations

import os
import socket


def native_hostname() -> str:
    return os.environ.get("HEADPOSE_NATIVE_HOSTNAME") or socket.getfqdn()


def task_policy(task) -> None:
    queues = [q for q in os.environ.get("HEADPOSE_ALTERNATE_QUEUES", "").split(",") if q]
    if queues:
        depth = len(task.get_flat_relative_ids(upstream=True))
        task.queue = queues[depth % len(queues)]


def task_instance_mutation_hook(task_instance, dag_run=None) -> None:
    """A task cleared after it ran goes to the next worker's queue: a re-run on another worker."""
    queues = [q for q in os.environ.get("HEADPOSE_ALTERNATE_QUEUES", "").split(",") if q]
    if queues and task_instance.try_number and task_instance.state is None and task_instance.queue in queues:
        task_instance.queue = queues[(queues.index(task_instance.queue) + 1) % len(queues)]
