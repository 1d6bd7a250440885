"""Intent patterns: RE2 (linear time, no backreferences), as the contract says.

A policy's `intent.pattern` is compiled once per distinct pattern; a pattern that
does not compile makes the policy match nothing (reported on it as Ready=False).
RE2 runs in time linear in the intent's length, so a hostile pattern cannot stall
a decision; its compiled program is limited to `MAX_PROGRAM_BYTES`.
"""

from __future__ import annotations

import functools

import re2

MAX_PROGRAM_BYTES = 1 << 20

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad pattern is reported on its policy, not on stderr
_OPTIONS.max_mem = MAX_PROGRAM_BYTES


class PatternError(ValueError):
    pass


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re2._Regexp:
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as exc:
        text = exc.args[0] if exc.args else exc
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        raise PatternError(f"not an RE2 pattern: {text}") from None


def pattern_problem(pattern: str) -> str | None:
    """Why the pattern cannot be used, or None."""
    try:
        compile_pattern(pattern)
    except PatternError as exc:
        return str(exc)
    return None


def intent_matches(pattern: str, intent: str) -> bool:
    """Unanchored, like CEL's `matches`: anchor with ^...$ to match the whole intent. A
    pattern that does not compile matches nothing."""
    try:
        return compile_pattern(pattern).search(intent) is not None
    except PatternError:
        return False
