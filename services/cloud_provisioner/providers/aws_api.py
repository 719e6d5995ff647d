"""boto3 behind asyncio, and the one classification of AWS errors into the port's CloudError classes.

boto3 is synchronous: every call runs in a worker thread (`asyncio.to_thread`), so a slow API
never blocks the event loop (other clusters keep going). Clients are created lazily per
(service, region), under a lock, because a boto3 Session is not thread-safe (its clients are).
botocore's own retries (standard mode) absorb short throttling bursts; what is left is
classified here and raised, and the consumer runtime redelivers with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from services.cloud_provisioner.providers.base import (
    CloudError,
    InvalidInstanceTypeError,
    QuotaExceededError,
    ResourceNotFoundError,
    TerminalCloudError,
    ThrottlingError,
    TransientCloudError,
)

log = logging.getLogger("flotilla.cloud_provisioner.aws")
T = TypeVar("T")

# ---------------------------------------------------------------- error classification
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "RequestThrottledException",
        "SlowDown",
        "EC2ThrottledException",
        "PriorRequestNotComplete",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
    }
)
# Server-side trouble, or a conflict with an operation still running (retry once it is done), or
# the eventual consistency of a freshly created resource.
TRANSIENT_CODES = frozenset(
    {
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "Unavailable",
        "InternalFailure",
        "InternalError",
        "InternalServerError",
        "InternalServiceError",
        "InternalServiceException",
        "ServerException",
        "ServiceFailure",
        "RequestTimeout",
        "RequestTimeoutException",
        "ResourceInUseException",
        "ConcurrentModification",
        "ConcurrentModificationException",
        "IncorrectState",
        "IncorrectInstanceState",
        "DependencyViolation",
        "DeleteConflict",
        "InvalidIPAddress.InUse",
        "InvalidSubnet.Conflict",
        "Resource.AlreadyAssociated",
    }
)
QUOTA_CODES = frozenset(
    {
        "LimitExceededException",
        "LimitExceeded",
        "ResourceLimitExceeded",
        "VpcLimitExceeded",
        "AddressLimitExceeded",
        "NatGatewayLimitExceeded",
        "InternetGatewayLimitExceeded",
        "SubnetLimitExceeded",
        "SecurityGroupLimitExceeded",
        "RouteTableLimitExceeded",
        "RulesPerSecurityGroupLimitExceeded",
        "ServiceQuotaExceededException",
        "InsufficientCapacity",
        "InsufficientInstanceCapacity",
    }
)
DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnauthorizedOperation",
        "UnauthorizedException",
        "AuthFailure",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "OptInRequired",
        "ExpiredToken",
        "ExpiredTokenException",
        "MissingAuthenticationToken",
        "NotAuthorized",
    }
)
INVALID_CODES = frozenset(
    {
        "InvalidParameterException",
        "InvalidParameterValue",
        "InvalidParameterValueException",
        "InvalidParameter",
        "InvalidParameterCombination",
        "InvalidRequestException",
        "ValidationError",
        "ValidationException",
        "MalformedPolicyDocument",
        "InvalidInput",
    }
)
UNSUPPORTED_ZONE_CODES = frozenset({"UnsupportedAvailabilityZoneException", "InvalidAvailabilityZone"})
NOT_FOUND_CODES = frozenset({"ResourceNotFoundException", "NoSuchEntity", "NotFoundException", "NotFound"})
# A create that lost to an existing resource of the same name: the caller adopts it (if it is ours).
ALREADY_EXISTS_CODES = frozenset(
    {
        "EntityAlreadyExists",
        "ResourceInUseException",
        "InvalidGroup.Duplicate",
        "AlreadyExists",
        "ResourceAlreadyExistsException",
    }
)


def _error_of(exc: ClientError) -> tuple[str, str, int]:
    err = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return str(err.get("Code") or "Unknown"), str(err.get("Message") or ""), status


def _invalid(code: str, message: str, detail: str) -> CloudError:
    """InvalidParameter-like errors: which one decides whether retrying can help."""
    text = message.lower()
    if "instance type" in text or "instancetype" in text:
        return InvalidInstanceTypeError("InvalidInstanceType", f"instance type not available here: {detail}")
    if "version" in text and ("unsupported" in text or "not supported" in text or "invalid" in text):
        return TerminalCloudError("UnsupportedVersion", f"Kubernetes version not supported by EKS: {detail}")
    if "availability zone" in text and ("not support" in text or "insufficient capacity" in text):
        return TerminalCloudError("UnsupportedAvailabilityZone", detail)
    if "role" in text and ("assume" in text or "does not exist" in text or "propagat" in text):
        # A role created seconds ago is not yet visible to EKS/EC2 (IAM is eventually consistent).
        return TransientCloudError("IamPropagation", f"IAM role not usable yet, retrying: {detail}")
    return TerminalCloudError("InvalidParameter", detail)


def classify(exc: BaseException) -> CloudError:
    """Map a boto3/botocore exception to the port's error classes, with a stable code and a human message
    that keeps AWS's own code and text (what an operator searches for)."""
    if isinstance(exc, CloudError):
        return exc
    if isinstance(exc, ClientError):
        code, message, status = _error_of(exc)
        op = getattr(exc, "operation_name", "")
        detail = f"{op}: {code}: {message}" if op else f"{code}: {message}"
        if code in THROTTLING_CODES or status == 429:
            return ThrottlingError("Throttling", f"AWS is throttling requests ({detail})")
        if (
            code in QUOTA_CODES
            or code.endswith(("QuotaExceeded", "QuotaExceededException"))
            or (code.endswith("LimitExceeded") and code != "RequestLimitExceeded")
        ):
            return QuotaExceededError(
                "QuotaExceeded", f"an AWS quota is exhausted; raise it or free capacity ({detail})"
            )
        if code in DENIED_CODES:
            return TerminalCloudError("PermissionDenied", f"the AWS credentials may not do this ({detail})")
        if code in UNSUPPORTED_ZONE_CODES:
            return TerminalCloudError("UnsupportedAvailabilityZone", detail)
        if code in ("InvalidInstanceType", "UnsupportedInstanceType") or (
            code in ("Unsupported", "UnsupportedOperation") and "instance" in message.lower()
        ):
            return InvalidInstanceTypeError("InvalidInstanceType", detail)
        if code in INVALID_CODES:
            return _invalid(code, message, detail)
        if code in NOT_FOUND_CODES or code.endswith(".NotFound") or code.endswith("NotFoundException"):
            return ResourceNotFoundError("ResourceNotFound", detail)
        if code == "ResourceInUseException":
            return TransientCloudError("ResourceInUse", f"another operation on this resource is running ({detail})")
        if status >= 500 or any(word in code for word in ("Unavailable", "Internal", "Timeout", "Server")):
            return TransientCloudError("ServiceUnavailable", detail)
        if code in TRANSIENT_CODES:
            return TransientCloudError("Conflict", f"conflicts with a resource or operation in progress ({detail})")
        return TerminalCloudError(code, detail)
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError | ConnectionClosedError):
        return TransientCloudError("EndpointUnreachable", f"cannot reach the AWS API: {exc}")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return TerminalCloudError("NoCredentials", f"no AWS credentials found by the default chain: {exc}")
    if isinstance(exc, ParamValidationError | NoRegionError):
        return TerminalCloudError("InvalidRequest", str(exc))
    if isinstance(exc, BotoCoreError):
        return TransientCloudError("AwsClientError", str(exc))
    return TransientCloudError("Unexpected", f"{type(exc).__name__}: {exc}")


def aws_code(exc: BaseException) -> str:
    """The original AWS error code behind a classified error (`raise classify(e) from e`), or ''."""
    cause = exc.__cause__ if isinstance(exc, CloudError) else exc
    if isinstance(cause, ClientError):
        return _error_of(cause)[0]
    return ""


# ---------------------------------------------------------------- the client wrapper
class AwsApi:
    """Thread-safe, lazily created boto3 clients; every call async and classified."""

    def __init__(
        self,
        session: boto3.Session | None = None,
        *,
        endpoint_url: str | None = None,
        max_attempts: int = 5,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        self.session = session or boto3.Session()
        self.endpoint_url = endpoint_url
        self.config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            user_agent_extra="flotilla",
        )
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def client(self, service: str, region: str) -> Any:
        with self._lock:
            key = (service, region)
            if key not in self._clients:
                self._clients[key] = self.session.client(
                    service, region_name=region, endpoint_url=self.endpoint_url, config=self.config
                )
            return self._clients[key]

    def _sync_call(self, service: str, region: str, op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = getattr(self.client(service, region), op)(**kwargs)
        result.pop("ResponseMetadata", None)
        return result

    def _sync_pages(self, service: str, region: str, op: str, key: str, kwargs: dict[str, Any]) -> list[Any]:
        client = self.client(service, region)
        if not client.can_paginate(op):
            return list(getattr(client, op)(**kwargs).get(key, []))
        out: list[Any] = []
        for page in client.get_paginator(op).paginate(**kwargs):
            out.extend(page.get(key, []))
        return out

    async def call(self, service: str, region: str, op: str, **kwargs: Any) -> dict[str, Any]:
        """One API call in a worker thread; botocore errors come out as classified CloudErrors."""
        try:
            return await asyncio.to_thread(self._sync_call, service, region, op, kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc) from exc

    async def pages(self, service: str, region: str, op: str, key: str, **kwargs: Any) -> list[Any]:
        """Every item of a (paginated) list/describe call."""
        try:
            return await asyncio.to_thread(self._sync_pages, service, region, op, key, kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc) from exc


# ---------------------------------------------------------------- waiting and fan-out
class Waiter:
    """Polls with async sleeps until a probe says done; gives up with a *retryable* error after `timeout_s`
    (below the handler timeout), so a slow EKS create is picked up again by the next delivery."""

    def __init__(self, poll_s: float, timeout_s: float) -> None:
        self.poll_s = poll_s
        self.timeout_s = timeout_s

    async def until(self, what: str, probe: Callable[[], Awaitable[tuple[bool, T]]]) -> T:
        deadline = time.monotonic() + self.timeout_s
        while True:
            done, value = await probe()
            if done:
                return value
            if time.monotonic() > deadline:
                raise TransientCloudError("StillInProgress", f"{what} not done after {self.timeout_s:.0f}s")
            await asyncio.sleep(self.poll_s)


