"""Reading request headers, for the resources and the responders."""

from __future__ import annotations

from twisted.web import server


def request_header(request: server.Request, name: str) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


def not_modified(request: server.Request) -> bool:
    """Whether the client's ``If-None-Match`` matches the ETag set on this response (RFC 9110 13.1.2): ``*``, or
    any tag of its list, a weak ``W/"..."`` one too (If-None-Match compares weakly)."""
    condition = request_header(request, "If-None-Match")
    ours = request.responseHeaders.getRawHeaders("ETag")
    if not condition or not ours:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in condition.split(",")}
    return "*" in tags or ours[0] in tags
