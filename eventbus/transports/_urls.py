"""Server URLs as messages and reprs show them: without the password."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["without_password"]


def without_password(url: str) -> str:
    """*url* with any password replaced by ``***`` (the host kept as written: an IPv6 host
    keeps its brackets)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))
