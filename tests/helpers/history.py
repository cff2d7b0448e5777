"""Reading what a workflow's exported history holds, payloads decoded."""

from __future__ import annotations

import base64
import contextlib


def decoded_payloads(node: object) -> list[str]:
    """Every base64 `data` field of every payload, decoded."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, str):
                with contextlib.suppress(ValueError):
                    found.append(base64.b64decode(value).decode(errors="replace"))
            found.extend(decoded_payloads(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(decoded_payloads(item))
    return found
