"""Answer release approval requests from a terminal: ``python -m headpose.registry.release_cli``.

Airflow's own CLI has no command for Human-in-the-loop requests, so this speaks its REST
API as any client does: a token from the auth manager's ``/auth/token`` (the user's own
login; FAB checks the role, the request its ``approvers``), then the request's
``hitlDetails``. Standard library only.

    python -m headpose.registry.release_cli --airflow-url http://localhost:8080 --user jo list
    python -m headpose.registry.release_cli ... approve <run_id> [--comment "..."]
    python -m headpose.registry.release_cli ... reject <run_id> --comment "class pan ctr got worse"

The password comes from ``$AIRFLOW_PASSWORD`` or a prompt.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, Sequence
from urllib.parse import quote

DAG_ID = "headpose_retraining"
TASK_ID = "approve_release"


class Airflow:
    """The REST API (v2) with a bearer token."""

    def __init__(self, url: str, user: str, password: str):
        self.url = url.rstrip("/")
        self.token = self._send("POST", "/auth/token", {"username": user, "password": password},
                                token=None)["access_token"]

    def _send(self, method: str, path: str, body: dict | None = None, token: str | None = "self") -> Any:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, method=method, headers=headers,
                                         data=None if body is None else json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read()
        return json.loads(text) if text else {}

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        return self._send(method, path, body)


def waiting(airflow: Airflow) -> list[dict[str, Any]]:
    """The requests of the DAG nobody has answered yet."""
    found = airflow.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/~/hitlDetails?response_received=false")
    return [d for d in found.get("hitl_details", []) if d["task_instance"]["task_id"] == TASK_ID]


def respond(airflow: Airflow, run_id: str, option: str, comment: str | None) -> dict[str, Any]:
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/{TASK_ID}/-1/hitlDetails"
    return airflow.call("PATCH", path, {"chosen_options": [option], "params_input": {"comment": comment}})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m headpose.registry.release_cli",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--airflow-url", required=True, help="the API server, e.g. http://localhost:8080")
    parser.add_argument("--user", required=True, help="your Airflow login (password: $AIRFLOW_PASSWORD or a prompt)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the requests waiting for an answer")
    for name in ("approve", "reject"):
        answer = commands.add_parser(name, help=f"{name} the run's model")
        answer.add_argument("run_id")
        answer.add_argument("--comment", default=None, help="kept with the version's evidence")
    args = parser.parse_args(argv)
    password = os.environ.get("AIRFLOW_PASSWORD") or getpass.getpass(f"password of {args.user}: ")
    try:
        airflow = Airflow(args.airflow_url, args.user, password)
        if args.command == "list":
            for request in waiting(airflow):
                ti = request["task_instance"]
                print(f"{ti['dag_run_id']}  {request['subject']}  (waiting since {request.get('created_at')})")
        else:
            answered = respond(airflow, args.run_id, "Approve" if args.command == "approve" else "Reject", args.comment)
            print(f"{args.command}d by {answered['responded_by']['name']} at {answered['responded_at']}")
    except urllib.error.HTTPError as error:
        print(f"error: HTTP {error.code}: {error.read().decode(errors='replace')[:500]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
