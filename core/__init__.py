"""ssa-server: a Janssen-compatible server for Software Statement Assertions (RFC 7591 §2.3)."""

__version__ = "0.1.0"
