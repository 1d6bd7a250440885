"""Runs last: no token read during the run appears in logs, Events, status or audit."""

from __future__ import annotations

import json

from agent_access.kube import AGENT_TASKS, EVENTS

from .cluster import SEEN_TOKENS


def test_tokens_appear_only_in_their_secrets(world, operator):
    assert SEEN_TOKENS, "the run read no tokens: nothing to check"
    haystacks = {
        "operator logs": operator.logs(),
        "audit file": operator.audit_file.read_text() if operator.audit_file.exists() else "",
        "events": json.dumps(world.kube.list(EVENTS)),
        "agenttasks": json.dumps(world.kube.list(AGENT_TASKS)),
    }
    for token in SEEN_TOKENS:
        # the JWT signature part alone must not appear either
        for needle in (token, token.rsplit(".", 1)[-1]):
            for where, text in haystacks.items():
                assert needle not in text, f"a token leaked into {where}"
