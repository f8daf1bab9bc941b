"""The stack's auth manager: FAB's, which also knows a release approver by user name.

Airflow keys a Human-in-the-loop respondent by the auth manager's user id; FAB's is the
row number of the user, which a deployment profile cannot know. The profile's
``approvers`` are user names, passed as the request's ``assigned_users`` with the name as
id (``headpose.planning.release_settings.assigned_users``), and this check accepts the
user's name as well as its id. Everything else is FAB's: roles, the login page, the
``airflow users`` commands. docker-compose.yaml names it in ``AIRFLOW__CORE__AUTH_MANAGER``.
"""
from __future__ import annotations

from typing import Any

from airflow.providers.fab.auth_manager.fab_auth_manager import FabAuthManager


class HeadposeAuthManager(FabAuthManager):
    """``FabAuthManager`` whose Human-in-the-loop check accepts an assigned user by name."""

    def is_authorized_hitl_task(self, *, assigned_users: set[str], user: Any) -> bool:
        return user.get_name() in assigned_users or super().is_authorized_hitl_task(
            assigned_users=assigned_users, user=user)
