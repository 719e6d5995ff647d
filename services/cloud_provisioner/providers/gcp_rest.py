"""The two Google JSON APIs the driver calls without a REST-capable client library.

google-cloud-iam's IAM admin client speaks gRPC only, and project IAM policies live in Cloud Resource
Manager (no client library installed), so service accounts and the project policy go through
`google.auth`'s AuthorizedSession, and HTTP errors become `google.api_core.exceptions` exactly as the
generated REST transports raise them (`from_http_response`), so one classification covers every API.
"""

from __future__ import annotations

from typing import Any

from google.api_core import exceptions as gexc
from google.auth.credentials import Credentials
from google.auth.transport.requests import AuthorizedSession

IAM_ENDPOINT = "https://iam.googleapis.com"
CRM_ENDPOINT = "https://cloudresourcemanager.googleapis.com"


class RestApi:
    """JSON over HTTPS against one Google API; synchronous (the driver calls it through asyncio.to_thread)."""

    def __init__(self, credentials: Credentials, base_url: str, timeout_s: float = 60.0) -> None:
        self.session = AuthorizedSession(credentials)
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.session.request(method, self.base_url + path, json=body, timeout=self.timeout_s)
        if response.status_code >= 400:
            raise gexc.from_http_response(response)
        if not response.content:
            return {}
        payload = response.json()
        return payload if isinstance(payload, dict) else {}
