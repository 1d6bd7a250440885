"""What the API server offers, checked at start-up (purely computational here).

The operator reads the server's version and the admission API it serves, logs what
it will and will not do, exposes it as metrics, and refuses to start where running
would be unsafe: a server older than the oldest supported minor, or one that does
not serve the admission policies the operator's protections rest on (docs/versions.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The oldest and newest minors tested (make test-matrix runs the oldest).
OLDEST_MINOR = 36
NEWEST_MINOR = 37

#: (feature, API group/version, resource, what it gives, what is lost without it)
FEATURES = (
    (
        "validating-admission-policies",
        "admissionregistration.k8s.io/v1",
        "validatingadmissionpolicies",
        "task status, annotations and finalizer written only by the operator; approvals "
        "guarded; per-task identities cannot mint tokens; the operator's identity held to "
        "its own objects",
    ),
    (
        "mutating-admission-policies",
        "admissionregistration.k8s.io/v1",
        "mutatingadmissionpolicies",
        "each task's requester and each approval's approver stamped by the API server",
    ),
)


@dataclass(frozen=True)
class ServerReport:
    version: str
    minor: int | None
    features: Mapping[str, bool] = field(default_factory=dict)
    #: Why running would be unsafe (the operator refuses to start), or empty.
    unsafe: tuple[str, ...] = ()
    #: What the operator will not do, or does less well, on this server.
    notes: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        out = [f"API server {self.version}"]
        for name, _gv, _res, gives in FEATURES:
            state = "yes" if self.features.get(name) else "NO"
            out.append(f"  {name}: {state} ({gives})")
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  UNSAFE: {u}" for u in self.unsafe]
        return out


def minor_of(version: Mapping[str, Any]) -> int | None:
    """The minor from /version (`minor` may carry a '+' on some distributions)."""
    raw = str(version.get("minor") or "")
    match = re.match(r"\d+", raw)
    if match:
        return int(match.group())
    match = re.match(r"v?1\.(\d+)", str(version.get("gitVersion") or ""))
    return int(match.group(1)) if match else None


def assess(version: Mapping[str, Any], served: Mapping[str, Iterable[str]]) -> ServerReport:
    """`served`: group/version -> the resources its discovery lists."""
    minor = minor_of(version)
    features = {name: resource in set(served.get(gv, ())) for name, gv, resource, _ in FEATURES}
    unsafe: list[str] = []
    notes: list[str] = []
    if minor is None:
        notes.append("the server's minor version could not be read; features decide")
    elif minor < OLDEST_MINOR:
        unsafe.append(
            f"Kubernetes 1.{minor} is older than the oldest supported 1.{OLDEST_MINOR}: the "
            "admission policies (MutatingAdmissionPolicy is GA from 1.36) and CRD rules this "
            "version ships do not install there, and without them any task creator could "
            "act as any agent"
        )
    elif minor > NEWEST_MINOR:
        notes.append(f"Kubernetes 1.{minor} is newer than the newest tested 1.{NEWEST_MINOR}")
    for name, gv, resource, gives in FEATURES:
        if not features[name]:
            unsafe.append(f"{gv} {resource} is not served: without it, no {gives}")
    return ServerReport(
        version=str(version.get("gitVersion") or "unknown"),
        minor=minor,
        features=features,
        unsafe=tuple(unsafe),
        notes=tuple(notes),
    )


def served_resources(discovery: Mapping[str, Any]) -> list[str]:
    """The resource names of an APIResourceList."""
    items = discovery.get("resources")
    return (
        [str(r.get("name")) for r in items if isinstance(r, Mapping)]
        if isinstance(items, list)
        else []
    )
