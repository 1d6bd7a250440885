"""The command line: `agent-access-operator run`."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


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
    run.add_argument("--metrics-host", default="0.0.0.0", help="address to listen on")
    run.add_argument("--audit-file", help="also append audit lines to this file")
    run.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        help="watch only these namespaces (repeatable or comma-separated); default: all namespaces",
    )
    run.add_argument(
        "--peering",
        help="kopf peering name: run several replicas, one active (default: standalone)",
    )
    run.add_argument(
        "--workers", type=int, default=16, help="threads for handlers and revocations (default 16)"
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
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def run(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers
    from .metrics import serve
    from .rules import DEFAULT_GUARDRAILS

    handlers.CONFIG.audit_file = args.audit_file
    handlers.CONFIG.workers = args.workers
    handlers.CONFIG.guardrails = DEFAULT_GUARDRAILS.extended(
        verbs=_split(args.forbid_verb),
        resources=_split(args.forbid_resource),
        write_protected=_split(args.protect_resource),
    )
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    if not args.verbose:  # kopf logs every handler run at INFO; keep our own decisions
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    serve(handlers.CONFIG.metrics, handlers.CONFIG.health, args.metrics_port, args.metrics_host)
    namespaces = _split(args.namespaces)
    kopf.run(
        standalone=not args.peering,
        peering_name=args.peering,
        clusterwide=not namespaces,
        namespaces=namespaces,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
