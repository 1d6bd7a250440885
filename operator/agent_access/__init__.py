"""agent-access-operator: just-in-time, least-privilege access for AI agents."""

__version__ = "0.1.0"
