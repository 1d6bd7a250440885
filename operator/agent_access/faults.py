"""Crash points for tests: the process dies (like SIGKILL) at a named step.

Set AGENT_ACCESS_CRASH_AT=<step> (only tests do) to kill the operator right after
that step of issuance or revocation, to prove every step is safe to die in.
"""

from __future__ import annotations

import os
import sys

ENV = "AGENT_ACCESS_CRASH_AT"

ISSUE_STEPS = (
    "issue:serviceaccount",
    "issue:role",
    "issue:rolebinding",
    "issue:token",
    "issue:secret",
    "issue:status",
)
REVOKE_STEPS = (
    "revoke:rolebindings",
    "revoke:serviceaccount",
    "revoke:secret",
    "revoke:roles",
    "revoke:status",
)


def checkpoint(step: str) -> None:
    if os.environ.get(ENV) == step:
        sys.stderr.write(f"crash injected after {step}\n")
        sys.stderr.flush()
        os._exit(137)
