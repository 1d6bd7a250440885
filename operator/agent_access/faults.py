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


HOLD_ENV = "AGENT_ACCESS_HOLD"
#: Where a test may pause the operator (AGENT_ACCESS_HOLD=<step>=<seconds>[,...]): to
#: prove that the enforcement point refuses while a revocation or a re-evaluation has
#: not run yet.
HOLD_STEPS = ("revoke:start", "reevaluate:start", "authz:review")
#: Steps held the first time only (a stuck event loop: once is the fault).
HOLD_ONCE = {"authz:review"}
_held: set[str] = set()


def hold(step: str) -> None:
    raw = os.environ.get(HOLD_ENV)
    if not raw:
        return
    for part in raw.split(","):
        name, _, seconds = part.partition("=")
        if name == step and not (step in HOLD_ONCE and step in _held):
            _held.add(step)
            import time

            sys.stderr.write(f"holding {step} for {seconds} s\n")
            sys.stderr.flush()
            time.sleep(float(seconds or 0))
