"""Machines API request paths: built from names that cannot smuggle in slashes or queries,
and read back for the app they name."""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

_APP_IN_PATH = re.compile(r"/apps/([^/]+)")


def app_of(path: str) -> str:
    """The app a request path names (every Machines and logs API path names one)."""
    found = _APP_IN_PATH.search(path)
    return unquote(found.group(1)) if found else ""


def seg(value: str) -> str:
    """A URL path segment: an app name or machine id cannot smuggle in slashes or queries."""
    return quote(value, safe="")


def machine_path(app: str, machine_id: str) -> str:
    """The path of one machine of an app."""
    return f"/v1/apps/{seg(app)}/machines/{seg(machine_id)}"
