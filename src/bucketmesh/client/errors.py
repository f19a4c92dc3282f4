"""The client's exceptions: a small hierarchy a caller can act on.

::

    BucketmeshError
    ├── ApiError            the server refused the request (problem+json): never retried
    │   ├── BadRequest      400: ``field`` names what is wrong (``tokens``, ``rule``, ``key`` ...)
    │   ├── Unauthorized    401: the admin token is missing
    │   ├── Forbidden       403: the admin token is wrong
    │   └── NotFound        404: no rule gives the key limits
    ├── Unavailable         no region answered within the retry budget
    └── RateLimited         raised by ``limit()`` (decorator / context manager) on a denial

A 429 from ``rate()`` is an answer (a ``Decision`` with ``allowed=False``), not an
error: only ``limit()`` turns it into ``RateLimited``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bucketmesh.client.results import Decision


class BucketmeshError(Exception):
    """Every exception the client raises."""


class ApiError(BucketmeshError):
    """A problem+json answer: the request itself was refused (4xx, or an unexpected status)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        field: str | None = None,
        type: str = "about:blank",
        title: str = "",
        endpoint: str = "",
        body: dict[str, Any] | None = None,
    ) -> None:
        where = f" ({field})" if field else ""
        super().__init__(f"{status} {title or 'error'}{where}: {detail}")
        self.status = status
        self.detail = detail
        self.field = field
        self.type = type
        self.title = title
        self.endpoint = endpoint
        self.body = body or {}


class BadRequest(ApiError):
    """400: ``field`` names the field (or header) at fault."""


class Unauthorized(ApiError):
    """401: the endpoint needs ``Authorization: Bearer <admin token>``."""


class Forbidden(ApiError):
    """403: the admin token is wrong (or the node has none for this endpoint)."""


class NotFound(ApiError):
    """404: no rule gives the key limits (or the rule does not exist)."""


class Unavailable(BucketmeshError):
    """No region answered within the retry budget (attempts or elapsed time).

    ``attempts`` is how many HTTP attempts were made; ``errors`` holds, per endpoint
    tried, the last thing that went wrong (an exception's text or an HTTP status).
    """

    def __init__(self, message: str, *, attempts: int, errors: dict[str, str]) -> None:
        detail = "; ".join(f"{url}: {what}" for url, what in errors.items())
        super().__init__(
            f"{message} after {attempts} attempt(s)" + (f" ({detail})" if detail else "")
        )
        self.attempts = attempts
        self.errors = errors


class RateLimited(BucketmeshError):
    """Raised by ``limit()`` when the bucket denied the call; ``decision`` says when to retry."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(
            f"rate limited: bucket {decision.key!r} (rule {decision.rule!r}); "
            f"retry after {decision.retry_after:.3f}s"
        )
        self.decision = decision

    @property
    def retry_after(self) -> float:
        return self.decision.retry_after


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
}


def api_error(status: int, body: dict[str, Any], endpoint: str) -> ApiError:
    """The exception for a refused request, from its problem+json body (or lack of one)."""
    cls = _BY_STATUS.get(status, ApiError)
    field = body.get("field")
    return cls(
        status,
        str(body.get("detail") or body.get("title") or f"HTTP {status}"),
        field=field if isinstance(field, str) else None,
        type=str(body.get("type", "about:blank")),
        title=str(body.get("title", "")),
        endpoint=endpoint,
        body=body,
    )


__all__ = [
    "ApiError",
    "BadRequest",
    "BucketmeshError",
    "Forbidden",
    "NotFound",
    "RateLimited",
    "Unauthorized",
    "Unavailable",
    "api_error",
]
