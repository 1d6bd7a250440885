"""The command line: `agent-access-operator run`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from . import __version__

log = logging.getLogger("agent_access")

#: How long running work may take to finish on SIGTERM (the chart's grace period is 30 s).
SHUTDOWN_SECONDS = 10.0


def _split(values: list[str] | None) -> list[str]:
    """Repeatable, comma-separated values, each once, in order."""
    found = [v.strip() for item in values or () for v in item.split(",") if v.strip()]
    return list(dict.fromkeys(found))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-access-operator",
        description="Just-in-time, least-privilege, self-revoking Kubernetes access for AI agents.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator against the current kubeconfig")
    run.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        help="port for /metrics, /healthz and /readyz (default 8080)",
    )
    run.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address /metrics, /healthz and /readyz listen on (default 127.0.0.1; "
        "the chart sets 0.0.0.0 so the kubelet and Prometheus reach it)",
    )
    run.add_argument(
        "--operator-namespace",
        help="the operator's own namespace: nothing is ever granted there (default: "
        "POD_NAMESPACE, or the in-cluster service account's namespace)",
    )
    run.add_argument("--audit-file", help="also append audit lines to this file")
    run.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        help="watch only these namespaces (repeatable or comma-separated); default: all namespaces",
    )
    run.add_argument(
        "--leader-elect",
        action="store_true",
        help="run several replicas safely: only the holder of a Lease acts",
    )
    run.add_argument(
        "--leader-election-namespace",
        help="namespace of the Lease (default: the pod's own namespace)",
    )
    run.add_argument(
        "--leader-election-id",
        default="agent-access-operator",
        help="name of the Lease (default agent-access-operator)",
    )
    run.add_argument(
        "--lease-duration",
        type=int,
        default=15,
        help="seconds a leader may go without renewing before a standby takes over",
    )
    run.add_argument(
        "--lease-retry",
        type=float,
        default=2.0,
        help="seconds between renewals and acquisition attempts",
    )
    run.add_argument(
        "--grant-namespace",
        action="append",
        help="only grant into these namespaces (repeatable or comma-separated; "
        "default: any namespace)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=16,
        help="concurrency bound (default 16): revocation and decision threads, at most "
        "2x concurrent issuance writes: about 4x API requests in flight",
    )
    run.add_argument(
        "--forbid-verb", action="append", help="extra guardrail: never grant this verb"
    )
    run.add_argument(
        "--forbid-resource",
        action="append",
        help="extra guardrail: never grant anything on this resource",
    )
    run.add_argument(
        "--protect-resource",
        action="append",
        help="extra guardrail: never grant write verbs on this resource",
    )
    run.add_argument(
        "--notify-url",
        action="append",
        default=[],
        help="POST each decision here (repeatable): a CloudEvent, or a Slack message with "
        "--notify-format slack; retried in the background, never delaying a grant or a "
        "revocation",
    )
    run.add_argument(
        "--notify-secret-file",
        help="sign notifications with HMAC-SHA256 using this file's content "
        "(header X-AgentAccess-Signature: t=<unix>,v1=<hex of HMAC('<t>.<body>')>)",
    )
    run.add_argument(
        "--notify-format",
        choices=["cloudevents", "slack"],
        default="cloudevents",
        help="notification body: CloudEvents 1.0 structured JSON (default) or Slack",
    )
    run.add_argument(
        "--authz-port",
        type=int,
        help="serve the API server's authorization webhook (POST /authorize) and audit "
        "webhook (POST /audit) over TLS on this port, on every replica "
        "(docs/authorization-webhook.md)",
    )
    run.add_argument("--authz-cert", help="with --authz-port: the serving certificate (PEM)")
    run.add_argument("--authz-key", help="with --authz-port: its private key (PEM)")
    run.add_argument(
        "--authz-client-ca",
        help="with --authz-port: serve only clients with a certificate from this CA (the "
        "API server's webhook client certificate)",
    )
    run.add_argument(
        "--authz-allow-any-client",
        action="store_true",
        help="with --authz-port and no --authz-client-ca: serve any client (anyone who "
        "reaches the port can then send reviews and audit events: use lines, idle clocks)",
    )
    run.add_argument(
        "--authz-host",
        default="0.0.0.0",
        help="address the webhook listens on (default 0.0.0.0)",
    )
    run.add_argument(
        "--skip-server-check",
        action="store_true",
        help="start even on an API server the start-up check finds unsafe (docs/versions.md)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    check = sub.add_parser(
        "check",
        help="the decision for a task file, against the live cluster; nothing is created",
        description="Decide an AgentTask file as the operator would, against the live "
        "cluster's policies, namespaces, agent and pod, with the same engine; create "
        "nothing. Exit 0 if it would be granted, 1 if denied.",
    )
    check.add_argument("-f", "--filename", required=True, help="the AgentTask (YAML; - for stdin)")
    check.add_argument("-n", "--namespace", help="its namespace, if the file has none")
    check.add_argument("--as", dest="as_user", help="decide as if this user asked (default: you)")
    check.add_argument("--as-group", action="append", default=[], help="with --as: a group")
    check.add_argument("-o", "--output", choices=["text", "json"], default="text")
    for flag in ("--forbid-verb", "--forbid-resource", "--protect-resource", "--grant-namespace"):
        check.add_argument(flag, action="append", help="as the operator runs with it")
    check.add_argument(
        "--operator-namespace",
        default="agent-access-system",
        help="the operator's namespace, never granted into (default agent-access-system)",
    )
    audit = sub.add_parser(
        "audit",
        help="reconstruct an agent's path: requests, decisions, grants, revocations",
        description="Timeline of one AgentTask, or of every task of one agent, from the "
        "live cluster (status and Events) and, when given, an audit file. With --audit-file "
        "a deleted task can still be reconstructed from its audit lines alone.",
    )
    audit.add_argument("task", nargs="?", help="AgentTask name (omit with --agent)")
    audit.add_argument("-n", "--namespace", default="default", help="the tasks' namespace")
    audit.add_argument("--agent", help="every task of this agent (ServiceAccount) instead")
    audit.add_argument("--audit-file", help="audit lines written by `run --audit-file`")
    audit.add_argument(
        "--apiserver-log",
        help="the API server's audit log (audit.k8s.io/v1 JSON lines): each call of the "
        "task's per-task identity is shown as a use",
    )
    audit.add_argument(
        "--no-cluster", action="store_true", help="read only the audit file, not the cluster"
    )
    audit.add_argument("-o", "--output", choices=["text", "json"], default="text")
    return parser


def check_command(args: argparse.Namespace) -> int:
    import yaml

    from .dryrun import check
    from .kube import ConfigError, Kube, KubeError
    from .rules import DEFAULT_GUARDRAILS

    guardrails = DEFAULT_GUARDRAILS.extended(
        verbs=_split(args.forbid_verb),
        resources=_split(args.forbid_resource),
        write_protected=_split(args.protect_resource),
        target_namespaces=_split(args.grant_namespace) or None,
        protected_namespaces=[args.operator_namespace] if args.operator_namespace else [],
    )
    try:
        kube, namespace = Kube.from_kubeconfig()
        return check(
            kube, args.filename, args.namespace or namespace, args.as_user, args.as_group,
            args.output, guardrails,
        )  # fmt: skip
    except (OSError, ValueError, yaml.YAMLError, ConfigError, KubeError) as exc:
        print(f"check: {exc}", file=sys.stderr)
        return 2


def audit_command(args: argparse.Namespace) -> int:
    import json

    from .audit import render_text, timeline

    if not args.task and not args.agent:
        print("audit: name a task, or --agent", file=sys.stderr)
        return 2
    lines = []
    if args.audit_file:
        with open(args.audit_file, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
    tasks: list[dict] = []
    events: list[dict] = []
    if not args.no_cluster:
        from .kube import AGENT_TASKS, EVENTS, Kube

        kube = getattr(args, "kube", None) or Kube.from_environment(pool_size=2)
        if args.task:
            found = kube.get(AGENT_TASKS, args.namespace, args.task)
            tasks = [found] if found else []
        else:
            tasks = [
                t
                for t in kube.list(AGENT_TASKS, args.namespace)
                if (t.get("spec") or {}).get("agent") == args.agent
            ]
        events = kube.list(EVENTS, args.namespace)

    def mine(line: dict) -> bool:
        t = line.get("task") or {}
        if t.get("namespace") != args.namespace:
            return False
        return t.get("name") == args.task if args.task else line.get("agent") == args.agent

    lines = [line for line in lines if mine(line)]
    uids = [t["metadata"]["uid"] for t in tasks]
    for uid in dict.fromkeys(line["task"]["uid"] for line in lines):
        if uid not in uids:
            uids.append(uid)  # deleted from the cluster: the audit file still knows it
    if args.apiserver_log:
        lines += _apiserver_uses(args.apiserver_log, tasks, lines)
    from .uses import prefer_authorizer

    lines = prefer_authorizer(lines)
    by_uid = {t["metadata"]["uid"]: t for t in tasks}
    paths = [
        timeline(
            by_uid.get(uid),
            [e for e in events if (e.get("involvedObject") or {}).get("uid") == uid],
            [line for line in lines if line["task"]["uid"] == uid],
        )
        for uid in uids
    ]
    paths.sort(key=lambda p: (p["timeline"][0].get("time") or "") if p["timeline"] else "")
    if not paths:
        what = args.task or f"agent {args.agent}"
        print(f"audit: nothing found for {what} in namespace {args.namespace}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps({"tasks": paths}, indent=2))
    else:
        print(render_text(paths))
    return 0


def _apiserver_uses(path: str, tasks: list[dict], lines: list[dict]) -> list[dict]:
    """`used` lines from the API server's audit log for these tasks' identities."""
    import json

    from .authz import entry_of
    from .objects import base_name
    from .uses import line_of_event

    known: dict[tuple[str, str], dict] = {}
    # the tasks as the cluster has them: a call counts as the task's only with its token
    entries = {(e.namespace, e.identity): e for t in tasks if (e := entry_of(t)) is not None}
    for task in tasks:
        meta = task["metadata"]
        known[(meta["namespace"], base_name(meta["name"], meta["uid"]))] = {
            "task": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "agent": (task.get("spec") or {}).get("agent"),
        }
    for line in lines:  # tasks deleted since: their audit lines name them
        t = line.get("task") or {}
        if t.get("uid") and t.get("name"):
            key = (str(t.get("namespace")), base_name(t["name"], t["uid"]))
            known.setdefault(key, {"task": dict(t), "agent": line.get("agent")})
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            if ":aat-" not in raw:  # cheap: most of a busy log is other users
                continue
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            used = line_of_event(event, lambda ns, name: entries.get((ns, name)))
            if used is None:
                continue
            home, _, name = str(used["identity"]).partition("/")
            if (home, name) in known:
                out.append({**used, **known[(home, name)]})
    return out


def run(args: argparse.Namespace) -> int:
    import signal
    import time

    from .audit import AuditLog
    from .kube import Kube
    from .metrics import Health, Metrics, serve
    from .rules import DEFAULT_GUARDRAILS
    from .service import Service
    from .tasks import TaskWatch

    # Evaluating a costly request is pure Python CPU on one thread; a short switch
    # interval hands the interpreter to the revocation threads and the watches every
    # millisecond instead of every 5 ms while it runs.
    sys.setswitchinterval(0.001)
    if os.environ.get("AAO_TRACEMALLOC"):  # memory profiling: SIGUSR1 prints the top sites
        _trace_memory(int(os.environ["AAO_TRACEMALLOC"]))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[%(asctime)s] %(name)-24.24s [%(levelname)-7.7s] %(message)s",
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    namespaces = _split(args.namespaces)
    own = _operator_namespace(args)
    guardrails = DEFAULT_GUARDRAILS.extended(
        verbs=_split(args.forbid_verb),
        resources=_split(args.forbid_resource),
        write_protected=_split(args.protect_resource),
        target_namespaces=_split(args.grant_namespace) or None,
        protected_namespaces=[own] if own else [],
    )
    if namespaces:
        # Watching only some namespaces would hide policy changes elsewhere: grants go
        # only into watched namespaces.
        guardrails = guardrails.extended(target_namespaces=namespaces)
    metrics, health = Metrics(), Health()
    elector = _leader_elector(args) if args.leader_elect else None
    # Set by the signal handler, read by polling: a handler takes no lock (it runs on
    # the main thread, which may hold the very lock it would wait for).
    signalled: list[int] = []

    notifier = notifier_from(args, metrics)  # a bad secret file stops the start here
    audit_log = AuditLog(path=args.audit_file, listeners=[notifier] if notifier else [])
    # Connections for every thread that may call at once (decisions with their
    # concurrent writes, revocations, watches): a full pool would discard connections
    # and pay a TLS handshake for each new one.
    kube = Kube.from_environment(pool_size=4 * args.workers + 16, observer=metrics.api_call)
    _check_server(kube, metrics, args.skip_server_check)
    gate, cache, webhook = _enforcement_point(args, kube, audit_log, metrics, namespaces)
    if gate is not None:  # a replica answers reviews only once its watches have listed
        health.also.append(gate.listed)
        # stuck (its event loop not running): out of the Service at once, restarted soon
        health.also.append(webhook.responsive)
        health.alive.append(webhook.responsive)

    def stopping() -> bool:
        return bool(signalled)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: signalled.append(signum))
    serve(metrics, health, args.metrics_port, args.metrics_host)
    if elector:
        health.standby.set()
        if not elector.wait_for_leadership(should_stop=stopping):
            log.info("stopping before leading")
            return 0
        health.standby.clear()
    # without election the single instance acts: it is the leader (no NoLeader alert)
    metrics.leader.set(1)
    service = Service(kube, audit_log, metrics, guardrails, workers=args.workers, cache=cache)
    if gate is not None:  # the leader knows revocations before any status says so
        gate.live, gate.refused = service.live_state, service.recheck_refused
        gate.grant_spec = service.granted_spec
        service.uses = gate.last_used
    watch = TaskWatch(service, namespaces or None)
    try:
        service.start()
        if not stopping():
            watch.start()
            listed = time.monotonic() + 60
            while not watch.wait_synced(0.2) and not stopping():
                if time.monotonic() > listed:
                    log.warning("AgentTasks not listed after 60 s; still trying")
                    listed = float("inf")
            health.ready.set()
            log.info("agent-access-operator is running")
        while not stopping():
            time.sleep(0.2)
        log.info("stopping")
    finally:
        if gate is not None:
            gate.drain(2.0)
        health.ready.clear()
        watch.stop()
        # The Lease is still renewed while the work already running finishes; only
        # then is it given up, so a standby never acts beside this process. Work that
        # does not finish in time dies with the process, and the Lease expires.
        idle = service.close(timeout=SHUTDOWN_SECONDS)
        if elector:
            if not idle:
                log.warning("work still running after %.0f s: exiting now", SHUTDOWN_SECONDS)
                logging.shutdown()
                os._exit(1)
            elector.release()
    return 0


def _check_server(kube: Any, metrics: Any, skip: bool) -> None:
    """Read the server's version and admission API; log and expose what the operator
    will and will not do there; refuse to start where running would be unsafe."""
    from .kube import KubeError
    from .serverinfo import assess, served_resources

    gv = "admissionregistration.k8s.io/v1"
    try:
        version = kube.request("GET", "/version", resource="version")
        try:
            discovery = kube.request("GET", f"/apis/{gv}", resource="discovery")
        except KubeError as exc:
            if exc.status != 404:
                raise
            discovery = {}
    except KubeError as exc:  # an outage at start-up does not keep the operator down
        log.warning("could not check the API server (%s); starting anyway", exc)
        return
    report = assess(version, {gv: served_resources(discovery)})
    metrics.server(report)
    for line in report.lines():
        (log.error if report.unsafe else log.info)("%s", line)
    if report.unsafe and not skip:
        raise SystemExit(
            "refusing to start on this API server: "
            + "; ".join(report.unsafe)
            + " (docs/versions.md; --skip-server-check starts anyway)"
        )


def _enforcement_point(
    args: argparse.Namespace, kube: Any, audit_log: Any, metrics: Any, namespaces: list[str]
) -> tuple[Any, Any, Any]:
    """With --authz-port: the gate, the facts cache the grant service will share, and
    the webhook server, started now (standbys answer too). Else (None, None, None)."""
    if not args.authz_port:
        if args.authz_cert or args.authz_key or args.authz_client_ca:
            raise SystemExit("--authz-cert, --authz-key and --authz-client-ca need --authz-port")
        return None, None, None
    if not (args.authz_cert and args.authz_key):
        raise SystemExit("--authz-port needs --authz-cert and --authz-key")
    if not args.authz_client_ca and not args.authz_allow_any_client:
        raise SystemExit(
            "--authz-port needs --authz-client-ca (the CA of the API server's client "
            "certificate), or --authz-allow-any-client to serve anyone who reaches the port"
        )
    from .authz_server import AuthzServer
    from .facts import Cache
    from .gate import Gate

    cache = Cache(kube)
    gate = Gate(kube, cache, audit_log, namespaces=namespaces or None)
    try:
        server = AuthzServer(
            gate, args.authz_port, args.authz_cert, args.authz_key, args.authz_client_ca,
            args.authz_host, metrics,
        )  # fmt: skip
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--authz-cert/--authz-key/--authz-client-ca: {exc}") from None
    gate.start(own_cache=True)
    try:
        server.start()
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    return gate, cache, server


def notifier_from(args: argparse.Namespace, metrics: Any) -> Any:
    """The notification sender the flags ask for, or None."""
    from .notify import Notifier

    if not args.notify_url:
        if args.notify_secret_file:
            raise SystemExit("--notify-secret-file needs --notify-url")
        return None
    secret = None
    if args.notify_secret_file:
        try:
            with open(args.notify_secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise SystemExit(f"cannot read --notify-secret-file: {exc}") from exc
        if not secret:
            raise SystemExit("--notify-secret-file is empty")
    for url in args.notify_url:
        if not url.startswith(("https://", "http://")):
            raise SystemExit(f"--notify-url must be an http(s) URL: {url!r}")
    return Notifier(args.notify_url, secret, args.notify_format, metrics.notification)


def _trace_memory(frames: int) -> None:
    import signal
    import tracemalloc

    tracemalloc.start(max(1, frames))

    def dump(*_: object) -> None:
        snapshot = tracemalloc.take_snapshot()
        stats = snapshot.statistics("traceback" if frames > 1 else "lineno")
        total = sum(s.size for s in stats)
        print(f"tracemalloc: {total / 2**20:.1f} MiB traced", file=sys.stderr)
        for stat in stats[:25]:
            print(f"{stat.size / 2**20:8.2f} MiB {stat.count:8d}", file=sys.stderr)
            for line in stat.traceback.format()[-2 * frames :]:
                print(f"    {line}", file=sys.stderr)
        sys.stderr.flush()

    signal.signal(signal.SIGUSR1, dump)


def _pod_namespace() -> str | None:
    import os

    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _operator_namespace(args: argparse.Namespace) -> str | None:
    return args.operator_namespace or _pod_namespace()


def _leader_elector(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import socket
    import uuid

    from .kube import Kube
    from .leader import LeaderElector

    namespace = args.leader_election_namespace or _pod_namespace() or "default"
    identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    return LeaderElector(
        Kube.from_environment(pool_size=2),
        namespace,
        args.leader_election_id,
        identity,
        lease_seconds=args.lease_duration,
        retry_seconds=args.lease_retry,
    )


def main(argv: list[str] | None = None) -> int:
    from .kube import ConfigError, KubeError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return run(args)
        if args.command == "audit":
            return audit_command(args)
        if args.command == "check":
            return check_command(args)
    except (ConfigError, KubeError) as exc:
        print(f"agent-access-operator: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
