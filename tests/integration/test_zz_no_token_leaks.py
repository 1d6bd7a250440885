"""Runs last: no token read during the run appears in logs, Events, status or audit."""

from __future__ import annotations

import json

from agent_access.kube import AGENT_TASKS, EVENTS

from .cluster import SEEN_TOKENS, OperatorProcess


def test_tokens_appear_only_in_their_secrets(world, operator):
    assert SEEN_TOKENS, "the run read no tokens: nothing to check"
    haystacks = {
        "operator logs": "".join(op.logs() for op in OperatorProcess.everyone),
        "audit files": "".join(
            op.audit_file.read_text() for op in OperatorProcess.everyone if op.audit_file.exists()
        ),
        "events": json.dumps(world.kube.list(EVENTS)),
        "agenttasks": json.dumps(world.kube.list(AGENT_TASKS)),
    }
    for token in SEEN_TOKENS:
        # the JWT signature part alone must not appear either
        for needle in (token, token.rsplit(".", 1)[-1]):
            for where, text in haystacks.items():
                assert needle not in text, f"a token leaked into {where}"
