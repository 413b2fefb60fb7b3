"""Server URLs as messages and reprs show them: without the password."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["without_password"]


def without_password(url: str) -> str:
    """*url* with any password replaced by ``***``: the one in the user part, and a
    ``password`` query parameter (redis-py takes one). Otherwise the URL is kept as written
    (an IPv6 host keeps its brackets)."""
    parts = urlsplit(url)
    hidden = parts
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        user = f"{parts.username}:***@" if parts.username else ":***@"
        hidden = hidden._replace(netloc=user + host)
    params = parts.query.split("&")
    masked = ["password=***" if _is_password(param) else param for param in params]
    if masked != params:
        hidden = hidden._replace(query="&".join(masked))
    return url if hidden is parts else urlunsplit(hidden)


def _is_password(param: str) -> bool:
    return unquote(param.partition("=")[0]).strip() == "password"
