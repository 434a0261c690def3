"""Registry errors: one exception type, rendered as the Registry V2 JSON error body."""

from __future__ import annotations

import json


class RegistryError(Exception):
    """An error a client sees as ``{"errors": [{"code", "message", "detail"}]}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: object = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> bytes:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


def name_invalid(name: str) -> RegistryError:
    return RegistryError(400, "NAME_INVALID", "invalid repository name", {"name": name[:300]})


def digest_invalid(digest: str) -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", "invalid digest", {"digest": digest[:300]})


def tag_invalid(reference: str) -> RegistryError:
    return RegistryError(400, "MANIFEST_INVALID", "invalid tag or digest", {"reference": reference[:300]})


def name_unknown(registry: str) -> RegistryError:
    return RegistryError(
        404, "NAME_UNKNOWN", f"registry {registry!r} is not mirrored here", {"registry": registry[:300]}
    )


def manifest_unknown(name: str, reference: str, message: str = "manifest unknown") -> RegistryError:
    return RegistryError(404, "MANIFEST_UNKNOWN", message, {"name": name, "reference": reference})


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest})


def unsupported(method: str) -> RegistryError:
    return RegistryError(
        405,
        "UNSUPPORTED",
        f"{method} is not supported: this is a read-only mirror",
        headers={"Allow": "GET, HEAD"},
    )


class UpstreamError(Exception):
    """The upstream could not be reached or answered with a server error; the caller may serve stale data."""

    def __init__(self, registry: str, reason: str, status: int | None = None, retry_after: str | None = None):
        super().__init__(f"upstream {registry}: {reason}")
        self.registry = registry
        self.reason = reason
        self.status = status
        self.retry_after = retry_after

    def to_registry_error(self) -> RegistryError:
        if self.status == 429:
            headers = {"Retry-After": self.retry_after or "60"}
            message = f"upstream {self.registry}: {self.reason}"
            return RegistryError(429, "TOOMANYREQUESTS", message, headers=headers)
        return RegistryError(
            502 if self.status else 503,
            "UNAVAILABLE",
            f"upstream registry {self.registry} is unavailable: {self.reason}",
        )
