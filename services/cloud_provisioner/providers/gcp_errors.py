"""Google API errors → the port's error classes, one classification for every GCP API the driver calls.

Inputs are `google.api_core.exceptions` (what the REST transports and `from_http_response` raise), the
`error` of a finished GKE operation (a google.rpc.Status) and the `error.errors[]` of a finished Compute
operation. Over REST the exception class follows the HTTP status only (a FAILED_PRECONDITION arrives as
`BadRequest`), so the canonical status string and the ErrorInfo / legacy `errors[].reason` values are read
from the response body as well.

  rate limits (429, or RATE_LIMIT_EXCEEDED / rateLimitExceeded / "per minute" on any status) → ThrottlingError
  quota (QUOTA_EXCEEDED, "quota", "Insufficient regional quota", also on 403)             → QuotaExceededError
  other 429 / RESOURCE_EXHAUSTED                                                           → ThrottlingError
  404                                                                                      → ResourceNotFoundError
  409 ALREADY_EXISTS                                                                       → AlreadyExistsError
  409 ABORTED (etag race), FAILED_PRECONDITION, "operation in progress"/"resource not ready"
  /"in use by another resource" (an operation still runs), stock-outs                     → TransientCloudError
  400 naming the machine type                                                              → InvalidInstanceTypeError
  400 naming the (master/cluster) version                                                  → UnsupportedVersion
  other 400                                                                                → InvalidArgument (terminal)
  401 / 403                                                                                → PermissionDenied (terminal)
  5xx, timeouts, connection errors                                                         → TransientCloudError
"""

from __future__ import annotations

import re
from typing import Any

import requests
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc

from services.cloud_provisioner.providers.base import (
    CloudError,
    InvalidInstanceTypeError,
    QuotaExceededError,
    ResourceNotFoundError,
    TerminalCloudError,
    ThrottlingError,
    TransientCloudError,
)


class AlreadyExistsError(TransientCloudError):
    """A create found the name taken: the caller looks it up and adopts it (if it is ours)."""


_RATE = re.compile(r"rate.?limit|too many requests|per minute|per second|per 100 seconds", re.I)
_RATE_REASONS = {"RATE_LIMIT_EXCEEDED", "RATELIMITEXCEEDED", "USERRATELIMITEXCEEDED"}
_QUOTA = re.compile(r"quota.{0,40}(exceeded|insufficient)|(exceeded|insufficient).{0,40}quota", re.I)
_QUOTA_REASONS = {"QUOTA_EXCEEDED", "QUOTAEXCEEDED"}
_BUSY = re.compile(
    r"incompatible operation|operation\b.*\b(in progress|is running|still running)|another operation"
    r"|resource.?not.?ready|in.?use.?by.?another.?resource|currently (being )?(updat|delet|creat|modif|upgrad)"
    r"|please (try|retry) again|try again later",
    re.I,
)
_BUSY_REASONS = {"RESOURCE_NOT_READY", "RESOURCENOTREADY", "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE",
                 "RESOURCEINUSEBYANOTHERRESOURCE", "ZONE_RESOURCE_POOL_EXHAUSTED", "GCE_STOCKOUT",
                 "OPERATION_CANCELED"}  # fmt: skip
_MACHINE = re.compile(r"machine.?type", re.I)
_VERSION = re.compile(r"version", re.I)
_REST_PREFIX = re.compile(r"^(GET|POST|PUT|PATCH|DELETE) \S+: ")


def _body_error(exc: gexc.GoogleAPICallError) -> dict[str, Any]:
    response = getattr(exc, "response", None)
    if response is None or not hasattr(response, "json"):
        return {}
    try:
        payload = response.json()
    except Exception:  # not JSON: nothing more to learn
        return {}
    if isinstance(payload, list):
        payload = next((p for p in payload if isinstance(p, dict)), {})
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else {}


def status_of(exc: gexc.GoogleAPICallError) -> str:
    """The canonical status name ('FAILED_PRECONDITION', ...) from the body or the exception class."""
    status = _body_error(exc).get("status")
    if isinstance(status, str) and status:
        return status.upper()
    grpc_code = exc.grpc_status_code
    return str(getattr(grpc_code, "name", "") or "")


def reasons_of(exc: gexc.GoogleAPICallError) -> set[str]:
    out = {str(e.get("reason", "")) for e in (exc.errors or []) if isinstance(e, dict)}
    if exc.reason:
        out.add(str(exc.reason))
    return {r.upper() for r in out if r}


def message_of(exc: gexc.GoogleAPICallError) -> str:
    """The API's own message, without the 'POST http://…: ' prefix the REST transport adds."""
    return _REST_PREFIX.sub("", str(exc.message or exc))


def classify(exc: BaseException) -> CloudError | None:
    """The port error for `exc`; None when it is not a cloud API error (the caller re-raises it)."""
    if isinstance(exc, CloudError):
        return exc
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout | auth_exc.TransportError):
        return TransientCloudError("ConnectionError", str(exc))
    if isinstance(exc, auth_exc.DefaultCredentialsError):
        return TerminalCloudError("CredentialsUnavailable", str(exc))
    if isinstance(exc, auth_exc.RefreshError):
        return TransientCloudError("CredentialsRefresh", str(exc))
    if not isinstance(exc, gexc.GoogleAPICallError):
        return None
    return _classify_api(exc, status_of(exc), reasons_of(exc), message_of(exc))


def _classify_api(exc: gexc.GoogleAPICallError, status: str, reasons: set[str], message: str) -> CloudError:
    text = f"{message} {' '.join(reasons)}"
    code = exc.code if isinstance(exc.code, int) else 0
    if isinstance(exc, gexc.NotFound) or status == "NOT_FOUND":
        return ResourceNotFoundError("NotFound", message)
    if reasons & _RATE_REASONS or _RATE.search(message):
        return ThrottlingError("Throttling", message)
    if reasons & _QUOTA_REASONS or _QUOTA.search(message):
        return QuotaExceededError("QuotaExceeded", message)
    if isinstance(exc, gexc.TooManyRequests) or status == "RESOURCE_EXHAUSTED":
        return ThrottlingError("Throttling", message)
    if isinstance(exc, gexc.AlreadyExists) or status == "ALREADY_EXISTS" or "ALREADYEXISTS" in reasons \
            or "RESOURCE_ALREADY_EXISTS" in reasons:  # fmt: skip
        return AlreadyExistsError("AlreadyExists", message)
    if reasons & _BUSY_REASONS or _BUSY.search(text):
        return TransientCloudError("OperationInProgress", message)
    if isinstance(exc, gexc.Aborted | gexc.Conflict) or status == "ABORTED":
        return TransientCloudError("Conflict", message)
    if isinstance(exc, gexc.FailedPrecondition) or status == "FAILED_PRECONDITION":
        return TransientCloudError("FailedPrecondition", message)
    if isinstance(exc, gexc.BadRequest) or status in ("INVALID_ARGUMENT", "OUT_OF_RANGE"):
        if _MACHINE.search(text):
            return InvalidInstanceTypeError("InvalidInstanceType", message)
        if _VERSION.search(text):
            return TerminalCloudError("UnsupportedVersion", message)
        return TerminalCloudError("InvalidArgument", message)
    if isinstance(exc, gexc.Forbidden | gexc.Unauthorized) or status in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return TerminalCloudError("PermissionDenied", message)
    if isinstance(exc, gexc.ServerError | gexc.DeadlineExceeded) or code >= 500 or status in (
            "UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "UNKNOWN"):  # fmt: skip
        return TransientCloudError("ServerError", message)
    if 400 <= code < 500:
        return TerminalCloudError(type(exc).__name__, message)
    return TransientCloudError(type(exc).__name__, message)


def classify_operation_error(grpc_code: int, message: str) -> CloudError:
    """A GKE operation that finished with `error` (google.rpc.Status: code, message)."""
    exc = gexc.from_grpc_status(grpc_code, message)
    status = str(getattr(exc.grpc_status_code, "name", "") or "")
    return _classify_api(exc, status, set(), message)


def classify_compute_operation_error(http_status: int, errors: list[tuple[str, str]]) -> CloudError:
    """A Compute operation that finished with `error.errors[]` ((code, message) pairs)."""
    reasons = {code.upper() for code, _ in errors if code}
    message = "; ".join(f"{code}: {msg}" if code else msg for code, msg in errors) or "operation failed"
    exc = gexc.from_http_status(http_status or 400, message)
    return _classify_api(exc, "", reasons, message)
