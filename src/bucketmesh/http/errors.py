"""Refusals as values: ``ApiError`` carries status, detail and the field at fault
from where a problem is found to the one place that renders it as problem+json,
plus the request checks every endpoint shares (JSON bodies, decode errors)."""

from __future__ import annotations

import msgspec

from bucketmesh.http.server import Request, Response, problem
from bucketmesh.http.wire import error_field

JSON = "application/json"
PROBLEM = "application/problem+json"


class ApiError(Exception):
    """A request the API refuses, carried to one place that renders problem+json.

    ``reason`` is the bounded label of ``bucketmesh_rejected_requests_total``; the title is
    the status's reason phrase unless given."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        field: str | None = None,
        title: str | None = None,
        type_: str = "about:blank",
        headers: list[tuple[str, str]] | None = None,
        reason: str = "invalid",
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.type_ = type_
        self.headers = headers
        self.reason = reason

    def response(self) -> Response:
        return problem(
            self.status,
            self.title,
            self.detail,
            type_=self.type_,
            field=self.field,
            headers=self.headers,
        )


def bad_request(detail: str, field: str | None = None) -> ApiError:
    return ApiError(400, detail, field=field)


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON (or not declared at all)."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if (
        media
        and media != "application/x-www-form-urlencoded"
        and not (media == "application/json" or media.endswith("+json"))
    ):
        raise ApiError(
            415,
            f"the body must be JSON (Content-Type: application/json), got {media}",
            field="Content-Type",
        )


def body_error(error: msgspec.ValidationError | msgspec.DecodeError, body: bytes) -> ApiError:
    """The 400 (or 415) for a body that msgspec could not decode into its struct."""
    if isinstance(error, msgspec.DecodeError) and not isinstance(error, msgspec.ValidationError):
        if body.lstrip()[:1] not in (b"{", b"[", b'"') and not body.lstrip()[:1].isdigit():
            return ApiError(415, "the body is not JSON", field="body")
        return bad_request(f"malformed JSON: {error}", "body")
    return bad_request(str(error), error_field(error) or "body")
