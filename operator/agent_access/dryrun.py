"""`check -f task.yaml`: the operator's decision for a task file, without creating anything.

The same engine as the operator, over facts read from the live cluster (policies,
namespaces, the agent, the pod), with the built-in guardrails plus any given; the
requester is the caller (a SelfSubjectReview) unless `--as` names another. Nothing is
written. `spec.dryRun: true` on a real AgentTask gives the same decision recorded in the
cluster (audit line, status, Event).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from .engine import Denied, Granted, Requester, SpecError, evaluate, parse_task_spec
from .explain import Explainer
from .facts import Facts
from .kube import Kube
from .rules import DEFAULT_GUARDRAILS, Guardrails

#: What `check` assumes without flags: the built-in guardrails and the chart's namespace
DEFAULT_CHECK_GUARDRAILS = DEFAULT_GUARDRAILS.extended(protected_namespaces=["agent-access-system"])


def who_am_i(kube: Kube) -> Requester | None:
    """The caller as the API server authenticates it (authentication.k8s.io SelfSubjectReview)."""
    got = kube.request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        resource="selfsubjectreviews",
    )
    info = (got.get("status") or {}).get("userInfo") or {}
    if not info.get("username"):
        return None
    return Requester(info["username"], info.get("uid") or "", tuple(info.get("groups") or ()))


def decide(
    kube: Kube,
    task: Mapping[str, Any],
    namespace: str,
    requester: Requester | None,
    guardrails: Guardrails = DEFAULT_GUARDRAILS,
    now: datetime | None = None,
) -> Granted | Denied:
    """The decision the operator would take for this task now. Reads only."""
    try:
        spec = parse_task_spec(namespace, task.get("spec") or {}, requester)
    except SpecError as exc:
        from .model import Reason

        return Denied(Reason.INVALID_SPEC, str(exc))
    with ThreadPoolExecutor(8) as io:
        world = Facts(kube, io).world_from_api(spec)
    return evaluate(spec, world, now or datetime.now(UTC), guardrails)


def report(decision: Granted | Denied, asked_ttl: str | None) -> dict[str, Any]:
    if isinstance(decision, Denied):
        return {
            "decision": "Denied",
            "reason": decision.reason.value,
            # the message only: the detail may name what the caller may not read
            "message": decision.message,
        }
    return {
        "decision": "Granted",
        "reason": "PolicyAllowed",
        "message": decision.summary(),
        "ttl": f"{int(decision.ttl.total_seconds())}s",
        "askedTTL": asked_ttl,
        "expiresAt": decision.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "policies": decision.policy_keys,
        "grants": [
            {"namespace": g.namespace, "rules": [r.to_dict() for r in g.rules]}
            for g in decision.grants
        ],
    }


def render(result: Mapping[str, Any]) -> str:
    if result["decision"] == "Denied":
        return f"Denied ({result['reason']}): {result['message']}"
    lines = [f"Granted (nothing was created): {result['message']}"]
    lines.append(
        f"TTL {result['ttl']}" + (f" (asked {result['askedTTL']})" if result["askedTTL"] else "")
    )
    for g in result["grants"]:
        for rule in g["rules"]:
            groups = ",".join(repr(x) if x == "" else x for x in rule.get("apiGroups", []))
            lines.append(
                f"  {g['namespace']}: {','.join(rule['verbs'])} {','.join(rule['resources'])}"
                f" (apiGroups {groups})"
            )
    return "\n".join(lines)


def load(path: str) -> dict[str, Any]:
    import yaml

    if path == "-":
        text = sys.stdin.read()
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    docs = [d for d in yaml.safe_load_all(text) if d]
    tasks = [d for d in docs if isinstance(d, dict) and d.get("kind") == "AgentTask"]
    if len(tasks) != 1:
        raise ValueError(f"{path}: expected one AgentTask, found {len(tasks)}")
    return tasks[0]


def check(
    kube: Kube,
    path: str,
    namespace: str | None,
    as_user: str | None,
    as_groups: Sequence[str],
    output: str,
    guardrails: Guardrails = DEFAULT_GUARDRAILS,
) -> int:
    """Print the decision for the task in `path`; 0 if it would be granted, 1 if not."""
    task = load(path)
    ns = (task.get("metadata") or {}).get("namespace") or namespace or "default"
    if as_user:
        requester: Requester | None = Requester(as_user, "", tuple(as_groups))
    else:
        requester = who_am_i(kube)
    decision = decide(kube, task, ns, requester, guardrails)
    if isinstance(decision, Denied):  # the closest policy, if the caller may read it
        decision = Explainer(kube, self_review=not as_user).explain(decision, requester)
    result = report(decision, (task.get("spec") or {}).get("ttl"))
    result["requester"] = requester.to_dict() if requester else None
    print(json.dumps(result, indent=2) if output == "json" else render(result))
    return 0 if isinstance(decision, Granted) else 1
