"""The authorization webhook's decision, purely computational.

The API server asks, for each call of a per-task identity (its AuthorizationConfiguration
sends only those), a SubjectAccessReview (authorization.k8s.io/v1). The answer is
**deny** when the task behind the identity is not Active (ended, cancelled, being
deleted, expired, suspended, its pod gone, or no such task at all) or when a call
that needs a `recheck: true` rule fails its live re-evaluation; otherwise **no
opinion**, and RBAC decides as before. This module never allows anything.

No I/O here: `gate.py` gathers the facts (watch-fed, in memory) and calls these.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .engine import SA_PREFIX, Policy, TaskSpec, parse_task
from .model import IDENTITY_PREFIX, Phase
from .objects import base_name
from .rules import Rule, rule_covers

API_VERSION = "authorization.k8s.io/v1"

#: Phases in which a task's identity may act (RBAC still decides what it may do).
#: Pending covers the moment between the objects' creation and the status write.
LIVE_PHASES = frozenset({Phase.ACTIVE, Phase.PENDING, ""})


class ReviewError(ValueError):
    """The request is not a SubjectAccessReview this webhook can read."""


@dataclass(frozen=True, slots=True)
class Call:
    """One request of a per-task identity, as the API server describes it."""

    user: str
    #: The identity's namespace and ServiceAccount name (from `user`).
    home: str
    identity: str
    verb: str
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    #: Non-resource requests (discovery, /version, ...): the path.
    path: str = ""
    #: The API server's id of the credential the request carried ("JTI=<token id>"
    #: for a ServiceAccount token; empty in a SubjectAccessReview someone created).
    credential: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return self.home, self.identity

    def atom(self) -> tuple[str, str, str, str | None]:
        """As RBAC rules see it: (apiGroup, resource[/subresource], verb, name)."""
        resource = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return self.api_group, resource, self.verb, self.name or None


def identity_of(user: str) -> tuple[str, str] | None:
    """(namespace, name) when `user` is a per-task identity, else None."""
    if not user.startswith(SA_PREFIX):
        return None
    parts = user[len(SA_PREFIX) :].split(":")
    if len(parts) != 2 or not parts[1].startswith(IDENTITY_PREFIX):
        return None
    return parts[0], parts[1]


def _text(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ReviewError(f"{key} must be a string")
    return value


def parse_review(body: Any) -> tuple[str, Call | None]:
    """(apiVersion to answer with, the call or None when the user is not a per-task
    identity). Raises ReviewError for anything malformed."""
    if not isinstance(body, Mapping) or body.get("kind") != "SubjectAccessReview":
        raise ReviewError("expected a SubjectAccessReview")
    version = body.get("apiVersion")
    if version not in (API_VERSION, "authorization.k8s.io/v1beta1"):
        raise ReviewError(f"unsupported apiVersion {version!r}")
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        raise ReviewError("spec must be an object")
    user = _text(spec, "user")
    who = identity_of(user)
    if who is None:
        return version, None
    res, nonres = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
    credential = credential_of(spec.get("extra"))
    if isinstance(res, Mapping):
        return version, Call(
            user=user,
            home=who[0],
            identity=who[1],
            credential=credential,
            verb=_text(res, "verb"),
            api_group=_text(res, "group"),
            resource=_text(res, "resource"),
            subresource=_text(res, "subresource"),
            namespace=_text(res, "namespace"),
            name=_text(res, "name"),
        )
    if isinstance(nonres, Mapping):
        return version, Call(
            user=user, home=who[0], identity=who[1], verb=_text(nonres, "verb"),
            path=_text(nonres, "path"), credential=credential,
        )  # fmt: skip
    raise ReviewError("neither resourceAttributes nor nonResourceAttributes")


#: The user "extra" key under which the API server names the credential of a request.
CREDENTIAL_ID = "authentication.kubernetes.io/credential-id"


def credential_of(extra: Any) -> str:
    values = extra.get(CREDENTIAL_ID) if isinstance(extra, Mapping) else None
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0][:256]
    return ""


def credential_hash(credential: str) -> str:
    """What the task's status records of its token's credential id (not the id itself:
    whoever reads the status cannot make a review look like the token's)."""
    return hashlib.sha256(credential.encode()).hexdigest()[:32]


def token_credential(token: str) -> str:
    """ "JTI=<jti>" of a ServiceAccount token (a JWT the operator just received), as the
    API server names it in a request's user extra; empty if it has none."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        jti = claims.get("jti") if isinstance(claims, dict) else None
    except (IndexError, ValueError):
        return ""
    return f"JTI={jti}" if isinstance(jti, str) and jti else ""


def response(version: str, denied: bool, reason: str) -> dict[str, Any]:
    """The SubjectAccessReview answer: deny, or no opinion (never allowed)."""
    status: dict[str, Any] = {"allowed": False}
    if denied:
        status["denied"] = True
    if reason:
        status["reason"] = reason[:1024]
    return {"apiVersion": version, "kind": "SubjectAccessReview", "status": status}


@dataclass(frozen=True, slots=True)
class TaskEntry:
    """What the webhook knows of one task, from the AgentTask alone (spec, metadata and
    the status only the operator writes)."""

    namespace: str
    name: str
    uid: str
    agent: str
    identity: str
    requester: str | None
    phase: str
    reason: str
    cancel: bool
    deleting: bool
    #: status.expiresAt (and the whole task's deadline when staged), epoch seconds.
    expires_at: float | None
    task_expires_at: float | None
    pod_name: str | None
    policies: tuple[str, ...]
    #: status.lastUsedAt: the last call any replica saw and recorded (epoch seconds),
    #: and as written.
    last_used: float | None
    last_used_text: str
    #: status.credentialHash: the hash of the token's credential id ("" when unknown).
    credential: str
    #: What a re-check reads of the task (its verdicts are kept per version).
    version: str
    #: The spec (None when unparseable: such a task never had a grant).
    spec: TaskSpec | None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def made(self, call: Call) -> bool:
        """Was the call made with the task's own token? (A SubjectAccessReview someone
        created about the identity carries no credential id, or another one.) A task
        whose status records no credential (issued by an older version, or its status
        not seen yet): any ServiceAccount token's call counts, as before."""
        if not self.credential:
            return call.credential.startswith("JTI=")
        return credential_hash(call.credential) == self.credential


def epoch(text: Any) -> float | None:
    """RFC 3339 (with or without fractions) to epoch seconds; None if unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        base = text.rstrip("Z")
        fmt = "%Y-%m-%dT%H:%M:%S.%f" if "." in base else "%Y-%m-%dT%H:%M:%S"
        return datetime.strptime(base[:26], fmt).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def entry_of(task: Mapping[str, Any]) -> TaskEntry | None:
    """The webhook's view of an AgentTask; None for anything without a name and UID."""
    meta = task.get("metadata") or {}
    spec = task.get("spec") or {}
    status = task.get("status") or {}
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
        return None
    if not isinstance(status, Mapping):
        status = {}
    ns, name, uid = meta.get("namespace"), meta.get("name"), meta.get("uid")
    if not (isinstance(ns, str) and isinstance(name, str) and isinstance(uid, str)):
        return None
    try:
        parsed: TaskSpec | None = parse_task(task)
    except Exception:  # a task that does not parse never had a grant: it denies
        parsed = None
    annotations = meta.get("annotations")
    requester = None
    if parsed is not None and parsed.requester is not None:
        requester = parsed.requester.username
    elif isinstance(annotations, Mapping):
        requester = str(annotations.get("agentaccess.io/requester-username") or "") or None
    policies = status.get("policies")
    return TaskEntry(
        namespace=ns,
        name=name,
        uid=uid,
        agent=str(spec.get("agent") or ""),
        identity=base_name(name, uid),
        requester=requester,
        phase=str(status.get("phase") or ""),
        reason=str(status.get("reason") or ""),
        cancel=spec.get("cancel") is True,
        deleting=bool(meta.get("deletionTimestamp")),
        expires_at=epoch(status.get("expiresAt")),
        task_expires_at=epoch(status.get("taskExpiresAt")),
        pod_name=str(spec.get("podName") or "") or None,
        policies=tuple(str(p) for p in policies) if isinstance(policies, list) else (),
        last_used=epoch(status.get("lastUsedAt")),
        last_used_text=str(status.get("lastUsedAt") or ""),
        credential=str(status.get("credentialHash") or ""),
        # what a re-check reads of the task (not lastUsedAt: its writes keep verdicts)
        version=f"{meta.get('generation')}|{status.get('phase')}|{status.get('stage')}|"
        f"{status.get('expiresAt')}|{','.join(str(p) for p in policies or ())}",
        spec=parsed,
    )


def inactive(entry: TaskEntry | None, now: float, live: bool | None = None) -> str | None:
    """Why the identity may not act now (the task is not Active), or None.

    `live` is the leader's own knowledge (its registry): True/False when it knows,
    None on a standby, which goes by the task's status.
    """
    if entry is None:
        return "no AgentTask has this identity"
    if entry.deleting:
        return f"AgentTask {entry.ref} is being deleted"
    if entry.cancel:
        return f"AgentTask {entry.ref} was cancelled"
    if entry.phase not in LIVE_PHASES:
        return f"AgentTask {entry.ref} is {entry.phase} ({entry.reason})"
    if live is False:
        return f"AgentTask {entry.ref} has no live grant"
    if live is None and entry.phase != Phase.ACTIVE:
        return f"AgentTask {entry.ref} is not Active yet"
    for deadline in (entry.expires_at, entry.task_expires_at):
        if deadline is not None and deadline <= now:
            return f"the grant of AgentTask {entry.ref} expired"
    return None


def recheck_rules(
    policies: Sequence[Policy], namespace: str, labels: Mapping[str, str] | None
) -> list[Rule]:
    """Every `recheck: true` rule of the policies that govern `namespace`."""
    if labels is None:
        return []
    return [r for p in policies if p.recheck_rules and p.governs(namespace, labels)
            for r in p.recheck_rules]  # fmt: skip


def needs_recheck(call: Call, rules: Sequence[Rule]) -> bool:
    """Does the call need a permission one of these rules gives?"""
    if not call.resource or not rules:
        return False
    atom = call.atom()
    return any(rule_covers(r, atom) for r in rules)
