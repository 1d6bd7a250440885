"""`kubectl agentaccess`: ask for, inspect, cancel and audit AgentTasks from the terminal.

Installed with the package as the executable `kubectl-agentaccess`, which kubectl finds
on PATH as the plugin `kubectl agentaccess`.

Exit codes (for scripts): 0 done (for `request --wait`: the task is Active); 1 the
outcome is not what was asked (Denied, Failed, Expired..., not found, timed out);
2 usage error or the cluster refused the request (e.g. self-approval, a stage moved
back); 3 the command's feature is not in this version of the operator (none now).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from .kube import AGENT_TASK_APPROVALS, AGENT_TASKS, SERVICE_ACCOUNTS, ConfigError, Kube, KubeError

TERMINAL = {"Denied", "Expired", "Revoked", "Completed", "Cancelled", "Failed"}
#: subcommands of the contract whose feature is not in this version yet, and which
LATER: dict[str, str] = {}
SUSPENDED = "agentaccess.io/suspended"

EXAMPLES = """examples:
  # ask for read access to pods and their logs in payments for 15 minutes, wait for it
  kubectl agentaccess request incident-4711 -n agents --agent triage-bot \\
      --intent "Summarize pod logs of incident 4711" --ttl 15m \\
      --rule payments:get,list:pods,pods/log --wait

  # the same across two namespaces and an API group (NAMESPACE:VERBS:RESOURCES[:GROUP])
  kubectl agentaccess request deploy-check -n agents --agent ci-bot --intent "verify rollout" \\
      --rule shop:get,list:deployments:apps --rule shop:get:pods

  kubectl agentaccess list -n agents             # or -A for every namespace
  kubectl agentaccess status incident-4711 -n agents -o yaml
  kubectl agentaccess cancel incident-4711 -n agents
  kubectl agentaccess audit incident-4711 -n agents
  kubectl agentaccess check -f task.yaml          # the decision, nothing created

  # a task waiting for human approval (Pending, AwaitingApproval): decide on it
  kubectl agentaccess approve deploy-2-4 -n agents        # shows it, and its UID
  kubectl agentaccess approve deploy-2-4 -n agents --uid 3f1c0d6e --comment "checked"
  kubectl agentaccess deny deploy-2-4 -n agents --uid 3f1c0d6e --comment "not in the freeze"

  # a staged task: move to its next stage (the previous stage's access goes first)
  kubectl agentaccess advance release-2-4 deploy -n agents --wait

  # stop an agent at once (every live grant revoked, new tasks denied), and let it go on
  kubectl agentaccess suspend triage-bot -n agents
  kubectl agentaccess resume triage-bot -n agents

exit codes: 0 done (request --wait: Active), 1 not the outcome asked for (Denied,
not found, timed out, not waiting for approval, ...), 2 usage or API error (e.g.
self-approval refused), 3 not in this operator version
"""


class Usage(Exception):
    """A command line that cannot be carried out (exit 2)."""


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", help="path to the kubeconfig (default: KUBECONFIG)")
    common.add_argument("--context", help="kubeconfig context to use")
    common.add_argument("-n", "--namespace", help="the tasks' namespace (default: the context's)")
    common.add_argument(
        "-o", "--output", choices=["table", "json", "yaml", "name"], default="table"
    )
    p = argparse.ArgumentParser(
        prog="kubectl agentaccess",
        description="Just-in-time access for AI agents: ask for, inspect, cancel and audit "
        "AgentTasks.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser(
        "request", parents=[common], help="create an AgentTask from flags", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    r.add_argument("name", help="the AgentTask's name")
    r.add_argument("--agent", required=True, help="the agent's ServiceAccount (task namespace)")
    r.add_argument("--intent", required=True, help="why: shown to approvers and auditors")
    r.add_argument(
        "--rule",
        action="append",
        required=True,
        metavar="NAMESPACE:VERBS:RESOURCES[:GROUP]",
        help="what, e.g. payments:get,list:pods,pods/log (repeatable; GROUP default core)",
    )
    r.add_argument("--ttl", help="how long, e.g. 15m (default: the policy's)")
    r.add_argument("--pod", help="the Pod doing the task: its end ends the grant")
    r.add_argument("--wait", action="store_true", help="wait until Active or decided")
    r.add_argument("--timeout", type=float, default=60, help="seconds --wait waits (60)")

    sub.add_parser("list", parents=[common], help="list AgentTasks").add_argument(
        "-A", "--all-namespaces", action="store_true", help="in every namespace"
    )
    for name, text in (("status", "show one AgentTask"), ("cancel", "cancel an AgentTask")):
        sub.add_parser(name, parents=[common], help=text).add_argument("name")
    a = sub.add_parser("audit", parents=[common], help="an AgentTask's path: grants, ends")
    a.add_argument("name")
    a.add_argument("--audit-file", help="audit lines written by `run --audit-file`")
    a.add_argument("--apiserver-log", help="the API server's audit log: calls of the identity")
    c = sub.add_parser(
        "check", parents=[common], help="the decision for a task file; nothing is created"
    )
    c.add_argument("-f", "--filename", required=True, help="the AgentTask (YAML; - for stdin)")
    c.add_argument("--as", dest="as_user", help="decide as if this user asked (default: you)")
    c.add_argument("--as-group", action="append", default=[], help="with --as: a group")
    for name, text in (
        ("approve", "approve an AgentTask waiting for approval (an AgentTaskApproval)"),
        ("deny", "deny an AgentTask waiting for approval (an AgentTaskApproval)"),
    ):
        d = sub.add_parser(name, parents=[common], help=text)
        d.add_argument("name", help="the AgentTask")
        d.add_argument(
            "--uid",
            help="the task's UID (or its first 8+ characters), as `status` shows it: the "
            "decision is for exactly the task you read, never one that took its name since",
        )
        d.add_argument("--comment", default="", help="why (shown to everyone, recorded)")
        d.add_argument("--stage", help="staged tasks: the stage decided on")
    adv = sub.add_parser("advance", parents=[common], help="move a staged task to a later stage")
    adv.add_argument("name", help="the AgentTask")
    adv.add_argument("stage", help="the stage to move to (later than the current one)")
    adv.add_argument("--wait", action="store_true", help="wait until the stage is decided")
    adv.add_argument("--timeout", type=float, default=60, help="seconds --wait waits (60)")
    for name, text in (
        ("suspend", "suspend an agent: its live grants end now, new tasks are denied"),
        ("resume", "lift an agent's suspension"),
    ):
        sub.add_parser(name, parents=[common], help=text).add_argument(
            "agent", help="the agent's ServiceAccount (in -n)"
        )
    for name, feature in LATER.items():
        s = sub.add_parser(name, parents=[common], help=f"{feature} (not in this version)")
        s.add_argument("args", nargs="*")
        s.add_argument("-f", "--filename")
    return p


def parse_rule(text: str) -> tuple[str, dict[str, Any]]:
    parts = text.split(":")
    if len(parts) not in (3, 4) or not all(parts[:3]):
        raise Usage(f"--rule {text!r}: expected NAMESPACE:VERBS:RESOURCES[:GROUP]")
    group = parts[3] if len(parts) == 4 else ""
    return parts[0], {
        "apiGroups": [group],
        "resources": parts[2].split(","),
        "verbs": parts[1].split(","),
    }


def task_body(args: argparse.Namespace) -> dict[str, Any]:
    access: dict[str, list[dict[str, Any]]] = {}
    for text in args.rule:
        ns, rule = parse_rule(text)
        access.setdefault(ns, []).append(rule)
    spec: dict[str, Any] = {
        "agent": args.agent,
        "intent": args.intent,
        "access": [{"namespace": ns, "rules": rules} for ns, rules in access.items()],
    }
    if args.ttl:
        spec["ttl"] = args.ttl
    if args.pod:
        spec["podName"] = args.pod
    return {
        "apiVersion": "agentaccess.io/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": args.name},
        "spec": spec,
    }


def age(created: str | None, now: datetime) -> str:
    if not created:
        return "<unknown>"
    then = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    s = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def task_rows(tasks: Sequence[dict[str, Any]], all_ns: bool, now: datetime) -> str:
    head = ["NAME", "AGENT", "PHASE", "REASON", "REQUESTER", "EXPIRES", "AGE"]
    rows = [["NAMESPACE", *head] if all_ns else head]
    for t in tasks:
        st = t.get("status") or {}
        row = [
            t["metadata"]["name"],
            str((t.get("spec") or {}).get("agent") or ""),
            st.get("phase") or "Pending",
            st.get("reason") or "",
            (st.get("requester") or {}).get("username") or "",
            st.get("expiresAt") or "",
            age(t["metadata"].get("creationTimestamp"), now),
        ]
        rows.append([t["metadata"]["namespace"], *row] if all_ns else row)
    return table(rows)


def show(obj: Any, output: str) -> str:
    if output == "json":
        return json.dumps(obj, indent=2)
    import yaml

    return yaml.safe_dump(obj, sort_keys=False).rstrip()


def describe(t: dict[str, Any]) -> str:
    meta, spec, st = t["metadata"], t.get("spec") or {}, t.get("status") or {}
    lines = [
        f"Name:         {meta['name']}",
        f"Namespace:    {meta['namespace']}",
        f"Agent:        {spec.get('agent')}",
        f"Intent:       {spec.get('intent')}",
        f"Requester:    {(st.get('requester') or {}).get('username') or '<not recorded>'}",
        f"Phase:        {st.get('phase') or 'Pending'}",
        f"Reason:       {st.get('reason') or ''}",
        f"Message:      {st.get('message') or ''}",
    ]
    if st.get("stage"):
        lines.append(f"Stage:        {st['stage']}")
    for e in st.get("stages") or ():
        lines.append(f"  stage {e.get('name')}: {e.get('phase')} {e.get('reason') or ''}".rstrip())
    for a in st.get("approvals") or ():
        who = (a.get("approver") or {}).get("username") or "<unknown>"
        counted = "counted" if a.get("counted") else f"not counted: {a.get('reason')}"
        comment = f' "{a["comment"]}"' if a.get("comment") else ""
        lines.append(f"Approval:     {a.get('decision')} by {who}{comment} ({counted})")
    for key, label in (
        ("grantedAt", "Granted:"),
        ("expiresAt", "Expires:"),
        ("endedAt", "Ended:"),
        ("serviceAccountName", "Identity:"),
        ("tokenSecretName", "Token in:"),
    ):
        if st.get(key):
            lines.append(f"{label:<13} {st[key]}")
    for g in st.get("grants") or ():
        for rule in g.get("rules") or ():
            lines.append(
                f"Granted in {g.get('namespace')}: {','.join(rule.get('verbs') or ())} "
                f"{','.join(rule.get('resources') or ())}"
            )
    return "\n".join(lines)


def wait_decided(kube: Kube, ns: str, name: str, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while True:
        t = kube.get(AGENT_TASKS, ns, name)
        phase = ((t or {}).get("status") or {}).get("phase")
        if t is None or phase == "Active" or phase in TERMINAL:
            return t
        if time.monotonic() > deadline:
            return t
        time.sleep(0.1)


def client(args: argparse.Namespace) -> tuple[Kube, str]:
    """A client from the kubeconfig (like kubectl: never the in-cluster identity first)."""
    kube, namespace = Kube.from_kubeconfig(args.kubeconfig, args.context)
    return kube, args.namespace or namespace or "default"


def run(args: argparse.Namespace) -> int:
    if args.command in LATER:
        print(
            f"kubectl agentaccess {args.command}: {LATER[args.command]} is not in this version "
            "of agent-access-operator",
            file=sys.stderr,
        )
        return 3
    kube, ns = client(args)
    now = datetime.now(UTC)
    if args.command == "request":
        created = kube.create(AGENT_TASKS, ns, task_body(args))
        if not args.wait:
            print(f"agenttask/{created['metadata']['name']} created")
            return 0
        t = wait_decided(kube, ns, args.name, args.timeout)
        if t is None:
            print(f"agenttask/{args.name} is gone", file=sys.stderr)
            return 1
        st = t.get("status") or {}
        phase = st.get("phase") or "Pending"
        if args.output in ("json", "yaml"):
            print(show(t, args.output))
        else:
            print(f"agenttask/{args.name} {phase}: {st.get('reason') or 'waiting'}")
            if st.get("message"):
                print(st["message"])
            if phase == "Active":
                print(f"token Secret: {st.get('tokenSecretName')} (key: token)")
                print(f"expires: {st.get('expiresAt')}")
        if phase != "Active":
            if phase not in TERMINAL:
                print(f"still {phase} after {args.timeout:g} s", file=sys.stderr)
            return 1
        return 0
    if args.command == "list":
        tasks = kube.list(AGENT_TASKS, None if args.all_namespaces else ns)
        tasks.sort(key=lambda t: (t["metadata"]["namespace"], t["metadata"]["name"]))
        if args.output in ("json", "yaml"):
            print(show({"apiVersion": "v1", "kind": "List", "items": tasks}, args.output))
        elif args.output == "name":
            print("\n".join(f"agenttask/{t['metadata']['name']}" for t in tasks))
        elif not tasks:
            where = "any namespace" if args.all_namespaces else f"namespace {ns}"
            print(f"No AgentTasks found in {where}.", file=sys.stderr)
        else:
            print(task_rows(tasks, args.all_namespaces, now))
        return 0
    if args.command == "check":
        import yaml

        from .dryrun import DEFAULT_CHECK_GUARDRAILS, check

        try:
            return check(
                kube, args.filename, ns, args.as_user, args.as_group,
                "json" if args.output in ("json", "yaml") else "text", DEFAULT_CHECK_GUARDRAILS,
            )  # fmt: skip
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise Usage(str(exc)) from None
    if args.command in ("suspend", "resume"):
        value = "true" if args.command == "suspend" else None
        patch = {"metadata": {"annotations": {SUSPENDED: value}}}
        if kube.get(SERVICE_ACCOUNTS, ns, args.agent) is None:
            print(f'serviceaccount "{args.agent}" not found in namespace {ns}', file=sys.stderr)
            return 1
        kube.merge_patch(SERVICE_ACCOUNTS, ns, args.agent, patch)
        done = "suspended: its live grants end now" if value else "resumed"
        print(f"agent {ns}/{args.agent} {done}")
        return 0
    if args.command == "audit":
        from .cli import audit_command

        return audit_command(
            argparse.Namespace(
                task=args.name,
                agent=None,
                namespace=ns,
                audit_file=args.audit_file,
                apiserver_log=args.apiserver_log,
                no_cluster=False,
                output="json" if args.output == "json" else "text",
                kube=kube,
            )
        )
    t = kube.get(AGENT_TASKS, ns, args.name)
    if t is None:
        print(f'agenttask "{args.name}" not found in namespace {ns}', file=sys.stderr)
        return 1
    if args.command == "status":
        print(show(t, args.output) if args.output in ("json", "yaml") else describe(t))
        return 0
    if args.command in ("approve", "deny"):
        return decide(kube, t, args)
    if args.command == "advance":
        return advance(kube, t, args)
    # cancel
    phase = (t.get("status") or {}).get("phase")
    if phase in TERMINAL:
        print(f"agenttask/{args.name} already ended: {phase}", file=sys.stderr)
        return 1
    kube.merge_patch(AGENT_TASKS, ns, args.name, {"spec": {"cancel": True}})
    print(f"agenttask/{args.name} cancelled")
    return 0


def advance(kube: Kube, task: dict[str, Any], args: argparse.Namespace) -> int:
    """spec.stage forward (the API server refuses moving back); --wait: until the new
    stage is live, or the task ended."""
    meta, spec, st = task["metadata"], task.get("spec") or {}, task.get("status") or {}
    names = [s.get("name") for s in spec.get("stages") or ()]
    if not names:
        print(f"agenttask/{meta['name']} has no stages", file=sys.stderr)
        return 1
    if args.stage not in names:
        print(f"agenttask/{meta['name']} has no stage {args.stage!r} ({', '.join(names)})",
              file=sys.stderr)  # fmt: skip
        return 1
    if (st.get("phase") or "Pending") in TERMINAL:
        print(f"agenttask/{meta['name']} already ended: {st.get('phase')}", file=sys.stderr)
        return 1
    kube.merge_patch(AGENT_TASKS, meta["namespace"], meta["name"], {"spec": {"stage": args.stage}})
    print(f"agenttask/{meta['name']} moving to stage {args.stage}")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        t = kube.get(AGENT_TASKS, meta["namespace"], meta["name"])
        status = (t or {}).get("status") or {}
        if t is None or status.get("phase") in TERMINAL:
            print(f"agenttask/{meta['name']} ended: {status.get('phase')}: {status.get('message')}")
            return 1
        if status.get("stage") == args.stage and status.get("phase") == "Active":
            print(f"stage {args.stage} Active: {status.get('message')}")
            return 0
        time.sleep(0.1)
    print(f"stage {args.stage} not live after {args.timeout:g} s", file=sys.stderr)
    return 1


def decide(kube: Kube, task: dict[str, Any], args: argparse.Namespace) -> int:
    """An AgentTaskApproval for this very task (its UID); who decided is stamped by
    the API server, which also refuses self-approval."""
    meta, st = task["metadata"], task.get("status") or {}
    phase = st.get("phase") or "Pending"
    if phase != "Pending":
        print(f"agenttask/{meta['name']} is {phase}, not waiting for approval", file=sys.stderr)
        return 1
    uid = str(meta["uid"])
    if not args.uid:
        print(describe(task))
        print(f"UID:          {uid}")
        print(
            f"\nto {args.command} exactly this task: kubectl agentaccess {args.command} "
            f"{meta['name']} -n {meta['namespace']} --uid {uid[:8]}",
            file=sys.stderr,
        )
        return 2
    if len(args.uid) < 8 or not uid.startswith(args.uid):
        print(
            f"agenttask/{meta['name']} has UID {uid}, not {args.uid}: it is not the task you "
            "read (deleted and created again?); nothing was decided",
            file=sys.stderr,
        )
        return 1
    spec: dict[str, Any] = {
        "taskName": meta["name"],
        "taskUID": meta["uid"],
        "decision": "Approve" if args.command == "approve" else "Deny",
    }
    if args.comment:
        spec["comment"] = args.comment
    if args.stage:
        spec["stage"] = args.stage
    made = kube.create(
        AGENT_TASK_APPROVALS,
        meta["namespace"],
        {
            "apiVersion": "agentaccess.io/v1alpha1",
            "kind": "AgentTaskApproval",
            "metadata": {"generateName": f"{meta['name'][:200]}-"},
            "spec": spec,
        },
    )
    if args.output in ("json", "yaml"):
        print(show(made, args.output))
    else:
        who = ((made.get("spec") or {}).get("approver") or {}).get("username") or "you"
        print(
            f"agenttaskapproval/{made['metadata']['name']} created: {spec['decision']} on "
            f"agenttask/{meta['name']} by {who}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except Usage as exc:
        print(f"kubectl agentaccess: {exc}", file=sys.stderr)
        return 2
    except (KubeError, ConfigError) as exc:
        print(f"kubectl agentaccess: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
