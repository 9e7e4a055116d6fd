"""Secrets never leave the process: tokens are removed from anything written, logged or served.

Tokens reach the runtime as a URI option (``tcp://pi:5000?token=T``), an option (``--token T``) or an
environment variable. :func:`redact` replaces their values by ``***`` in text (URIs, messages, argv), so
stats files, session files, recorder metadata, logs and HTTP answers carry the rest of the information but
not the secret. Sources keep the token in an attribute of their own and store only the redacted URI.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

MASK = "***"
SECRET_OPTIONS = ("--token",)
# token=VALUE in a URI query or a message (up to &, #, whitespace or a quote)
_TOKEN_IN_QUERY = re.compile(r"(?i)\b(token=)[^&#\s'\"]+")


def redact(text: Any) -> str:
    """``text`` with every ``token=VALUE`` replaced by ``token=***``."""
    return _TOKEN_IN_QUERY.sub(lambda m: m.group(1) + MASK, str(text))


def redact_argv(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with the values of ``--token`` (``--token T`` or ``--token=T``) and every
    ``token=`` in a URI masked."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        if name in SECRET_OPTIONS:
            if eq:
                out.append(f"{name}={MASK}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact(arg))
    return out


def redact_obj(obj: Any) -> Any:
    """A JSON-like structure with every string redacted and the values of keys named ``token`` masked."""
    if isinstance(obj, dict):
        return {k: (MASK if str(k).lower() == "token" and v else redact_obj(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj
