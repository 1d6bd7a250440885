"""Staged tasks: `status.stages[]`, the record of each stage. Purely computational.

Each entry is `{name, phase, reason, grantedAt, expiresAt, endedAt, grants}` (the
contract) plus `startedAt` (when the operator began deciding the stage: approvals
without a `stage` count for the stage waiting at the time they are made). Phases of
an entry: `Pending` (being decided, or waiting for approval), `Active`, `Completed`
(left by advancing: reason `Advanced`; or the last stage done: `StagesDone`),
`Skipped` (advanced past without being issued), and the task's end phases for the
stage that was current when the task ended.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import TaskSpec
    from .runtime import LiveGrant

ADVANCED = "Advanced"
SKIPPED = "Skipped"
Entries = tuple[Mapping[str, Any], ...]


def _time(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def precise(moment: datetime | None) -> str | None:
    """startedAt keeps microseconds: approvals (whole seconds) made in the second a stage
    began waiting cannot be told from ones made before it, and so do not count for it."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if moment else None


def parse_started(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _entry(name: str, phase: str, reason: str = "", **times: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "phase": phase}
    if reason:
        out["reason"] = reason
    out.update({k: v for k, v in times.items() if v is not None})
    return out


def active_entry(grant: LiveGrant, started: datetime | None) -> dict[str, Any]:
    return _entry(
        grant.spec.stage or "",
        "Active",
        "PolicyAllowed",
        startedAt=precise(started),
        grantedAt=_time(grant.granted_at),
        expiresAt=_time(grant.expires_at),
        grants=[g.to_status() for g in grant.grants],
    )


def first_stages(spec: TaskSpec, grant: LiveGrant) -> Entries:
    """The record when the task's first stage is issued (stages before the one asked
    for, if it did not start at the first, were skipped)."""
    skipped = [_entry(n, SKIPPED) for n in spec.stages[: spec.stage_index]]
    return (*skipped, active_entry(grant, grant.created_at))


def current(stages: Entries, name: str | None) -> int:
    """Index in `stages` of the entry of stage `name` (the last one of that name)."""
    for i in range(len(stages) - 1, -1, -1):
        if stages[i].get("name") == name:
            return i
    return -1


def started_at(stages: Entries, name: str | None) -> str | None:
    i = current(stages, name)
    return stages[i].get("startedAt") if i >= 0 else None


def leave(stages: Entries, names: Sequence[str], old: int, new: int, now: datetime) -> Entries:
    """Advancing from stage index `old` to `new`: the old stage's entry ends
    (Completed/Advanced if it was live, else Skipped), the stages between are Skipped,
    the new one is Pending from now."""
    out = [dict(e) for e in stages]
    i = current(stages, names[old])
    if i >= 0:
        was_live = out[i].get("phase") == "Active"
        out[i].update(
            phase="Completed" if was_live else SKIPPED,
            reason=ADVANCED if was_live else SKIPPED,
            endedAt=_time(now),
        )
    out += [_entry(n, SKIPPED) for n in names[old + 1 : new]]
    out.append(_entry(names[new], "Pending", "Deciding", startedAt=precise(now)))
    return tuple(out)


def enter(stages: Entries, grant: LiveGrant) -> Entries:
    """The current stage is issued: its entry becomes Active."""
    out = [dict(e) for e in stages]
    i = current(stages, grant.spec.stage)
    started = out[i].get("startedAt") if i >= 0 else None
    entry = active_entry(grant, None)
    if started:
        entry["startedAt"] = started
    if i >= 0:
        out[i] = entry
    else:
        out.append(entry)
    return tuple(out)


def end(stages: Entries, name: str | None, phase: str, reason: str, now: datetime) -> Entries:
    """The task ends while `name` is its stage: that entry ends with the task."""
    out = [dict(e) for e in stages]
    i = current(stages, name)
    if i >= 0 and out[i].get("phase") in ("Active", "Pending"):
        out[i].update(phase=phase, reason=reason, endedAt=_time(now))
    return tuple(out)


def sanitize(raw: Any) -> Entries:
    """status.stages as read back at start-up (written by the operator; admission keeps
    everyone else out): entries that are not objects with a name are dropped."""
    if not isinstance(raw, list):
        return ()
    return tuple(dict(e) for e in raw if isinstance(e, Mapping) and isinstance(e.get("name"), str))
