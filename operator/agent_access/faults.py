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
#: Where a test may pause the operator (AGENT_ACCESS_HOLD=<step>=<seconds>[x<times>]
#: [,...]; without x<times>, every time the step is reached): to prove that the
#: enforcement point refuses while a revocation or a re-evaluation has not run yet, and
#: what a blocked webhook event loop does.
HOLD_STEPS = ("revoke:start", "reevaluate:start", "authz:review")
_held: dict[str, int] = {}


def hold(step: str) -> None:
    raw = os.environ.get(HOLD_ENV)
    if not raw:
        return
    for part in raw.split(","):
        name, _, spec = part.partition("=")
        if name != step:
            continue
        seconds, _, times = spec.partition("x")
        if times and _held.get(step, 0) >= int(times):
            continue
        _held[step] = _held.get(step, 0) + 1
        import time

        sys.stderr.write(f"holding {step} for {seconds} s\n")
        sys.stderr.flush()
        time.sleep(float(seconds or 0))
