"""moto's server with IAM enforcement, recording every (principal, action, resource) it evaluates.

Started by ``iam_support.EnforcingMoto`` as its own process: ``INITIAL_NO_AUTH_ACTION_COUNT``
is a server-wide setting, so the suite's ordinary moto server stays unenforced. moto
decides each request in ``IAMRequestBase.check_action_permitted``; this wraps it to append
one JSON line per decision to the trace file, the record that ``iam_support.necessity``
evaluates each policy statement against (rather than re-running per action). Three S3
requests moto names otherwise than IAM are renamed first (``aws_action``).

Usage: ``python enforcing_moto.py <port> <trace.jsonl>`` with ``INITIAL_NO_AUTH_ACTION_COUNT``
set in the environment.
"""
from __future__ import annotations

import json
import sys
import threading
from urllib.parse import parse_qs, urlparse

from moto import server
from moto.iam import access_control


def aws_action(action: str, path: str) -> str:
    """IAM's name for an S3 request that moto's ``ACTION_MAP`` names otherwise.

    moto authorises HEAD of a bucket as ``s3:HeadBucket`` (no such IAM action: S3 asks for
    ``s3:ListBucket``), ``PUT ?retention`` as ``s3:PutObject`` and ``GET ?object-lock`` as
    ``s3:ListBucket``; S3 asks for the actions below. Every other name is IAM's already.
    """
    query = parse_qs(urlparse(path).query, keep_blank_values=True)
    if action == "s3:HeadBucket":
        return "s3:ListBucket"
    if action == "s3:PutObject" and "retention" in query:
        return "s3:PutObjectRetention"
    if action == "s3:ListBucket" and "object-lock" in query:
        return "s3:GetBucketObjectLockConfiguration"
    return action


def record_decisions(trace_path: str) -> None:
    original = access_control.IAMRequestBase.check_action_permitted
    lock = threading.Lock()

    def check_action_permitted(self, resource: str) -> None:
        self._action = aws_action(self._action, self._path)
        entry = {"user": getattr(self._access_key, "_owner_user_name", None), "action": self._action,
                 "resource": resource}
        try:
            original(self, resource)
        except Exception:
            entry["allowed"] = False
            raise
        else:
            entry["allowed"] = True
        finally:
            with lock, open(trace_path, "a") as trace:
                trace.write(json.dumps(entry) + "\n")

    access_control.IAMRequestBase.check_action_permitted = check_action_permitted


if __name__ == "__main__":
    port, trace_path = sys.argv[1], sys.argv[2]
    record_decisions(trace_path)
    server.main(["-H", "127.0.0.1", "-p", port])
