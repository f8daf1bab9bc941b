"""The one error type of the edge client: its message is the one line the command prints."""
from __future__ import annotations


class EdgeClientError(Exception):
    """Something the client cannot do as asked (missing format, bad checksum, unreadable image)."""
