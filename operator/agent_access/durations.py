"""Go duration syntax ("1h30m", "90s", "1.5h"), as used by `ttl` and `maxTTL`.

Purely computational, no side effects.
"""

from __future__ import annotations

import re
from datetime import timedelta

from .model import MAX_DURATION_SECONDS

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
#: The same grammar as a regular expression, for the CRD schema.
PATTERN = r"^([0-9]+(\.[0-9]*)?(ns|us|µs|ms|s|m|h))+$"


class DurationError(ValueError):
    pass


def parse_duration(text: str) -> timedelta:
    """Parse a positive Go duration; raise DurationError with a helpful message."""
    if not isinstance(text, str) or not text:
        raise DurationError("a duration is required, e.g. 10m or 1h30m")
    pos, total = 0, 0.0
    while pos < len(text):
        match = _PART.match(text, pos)
        if not match:
            raise DurationError(
                f"invalid duration {text!r}: use Go syntax such as 10m, 90s or 1h30m"
            )
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
        if total > MAX_DURATION_SECONDS:  # also keeps float/timedelta far from overflow
            raise DurationError(f"duration {text!r} is longer than the limit of 8784h (366 days)")
    if total <= 0:
        raise DurationError(f"duration {text!r} must be positive")
    if total > MAX_DURATION_SECONDS:
        raise DurationError(f"duration {text!r} is longer than the limit of 8784h (366 days)")
    return timedelta(seconds=total)
