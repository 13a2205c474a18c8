"""The gateway's error tree: each error's status and stable code (no HTTP classes here: they
become responses in one place above, :func:`gateway.proxy.headers.error_response`).

::

    GatewayError                    (status, stable ``code``)
    ├── BadRequest                  400 bad_request / invalid_target / invalid_path / …
    ├── UnknownCredential           400 unknown_credential  (no client keys: no such profile)
    ├── ClientUnauthenticated       401 client_unauthenticated
    ├── ClientForbidden             403 client_forbidden
    ├── RouteForbidden              403 auth_route_forbidden
    ├── RouteNotAllowed             403 route_not_allowed
    ├── CredentialNotAllowed        403 credential_not_allowed (not this client's, or none)
    ├── MethodNotAllowed            405 method_not_allowed
    ├── RequestTimeout              408 request_timeout
    ├── BodyTooLarge                413 body_too_large
    ├── ExpectationFailed           417 expectation_failed
    ├── RateLimited                 429 rate_limited        (+ Retry-After)
    ├── ClientBusy                  429 client_busy         (+ Retry-After)
    ├── ClientClosedRequest         499 client_closed_request (logged and counted, never sent)
    ├── TargetTooLong               414 request_line_too_long
    ├── HeaderTooLarge              431 header_too_large
    ├── TokenUnavailable            503 token_unavailable   (+ Retry-After)
    │   └── CredentialsRejected     503 credentials_rejected
    ├── UpstreamBusy                503 upstream_busy       (+ Retry-After)
    ├── CircuitOpen                 503 upstream_circuit_open (+ Retry-After)
    ├── ShuttingDown                503 shutting_down       (cut off by the shutdown deadline)
    └── UpstreamError               502 upstream_unreachable
        ├── UpstreamUnreachable     502 upstream_unreachable (no connection: nothing was sent)
        ├── UpstreamInvalidResponse 502 upstream_invalid_response
        ├── UpstreamTLSError        502 upstream_tls_error
        └── UpstreamTimeout         504 upstream_timeout
            └── DeadlineExceeded    504 upstream_timeout    (GATEWAY_TOTAL_TIMEOUT; not counted
                                                             as an upstream fault)

    AuthError                       a login/refresh call failed; ``reason`` is a fixed label

Every response the gateway makes itself carries :data:`GATEWAY_ERROR_HEADER` so callers can
tell it from an upstream answer. Messages never contain tokens or secrets.
"""

from __future__ import annotations

from typing import ClassVar, Final, Literal

GATEWAY_ERROR_HEADER: Final = "X-Repairy-Gateway-Error"

AuthReason = Literal["invalid_credentials", "refresh_rejected", "endpoint_misconfigured",
                     "request_rejected", "timeout", "connect_error", "server_error",
                     "rate_limited", "malformed_response", "lease_lost"]


class GatewayError(Exception):
    """An error the gateway answers itself; ``code`` is stable, ``message`` is for humans."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.retry_after = retry_after


class BadRequest(GatewayError):
    status = 400
    default_code = "bad_request"


class ClientUnauthenticated(GatewayError):
    status = 401
    default_code = "client_unauthenticated"


class ClientForbidden(GatewayError):
    status = 403
    default_code = "client_forbidden"


class RouteForbidden(GatewayError):
    status = 403
    default_code = "auth_route_forbidden"


class RouteNotAllowed(GatewayError):
    status = 403
    default_code = "route_not_allowed"


class CredentialNotAllowed(GatewayError):
    """With client keys: the profile named in the credential header is not one this client
    may use, or does not exist (the same answer, so names cannot be probed)."""

    status = 403
    default_code = "credential_not_allowed"


class UnknownCredential(GatewayError):
    """Without client keys: the credential header names no configured profile."""

    status = 400
    default_code = "unknown_credential"


class MethodNotAllowed(GatewayError):
    status = 405
    default_code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    default_code = "request_timeout"


class HeaderTooLarge(GatewayError):
    status = 431
    default_code = "header_too_large"


class TargetTooLong(GatewayError):
    status = 414
    default_code = "request_line_too_long"


class BodyTooLarge(GatewayError):
    status = 413
    default_code = "body_too_large"


class ExpectationFailed(GatewayError):
    status = 417
    default_code = "expectation_failed"


class RateLimited(GatewayError):
    """Over the gateway's rate limit (all callers, or this caller's own)."""

    status = 429
    default_code = "rate_limited"


class ClientBusy(GatewayError):
    """This caller already has its most concurrent requests in flight."""

    status = 429
    default_code = "client_busy"


class ClientClosedRequest(GatewayError):
    """The caller left before its answer was sent (nginx's 499): nothing can be sent."""

    status = 499
    default_code = "client_closed_request"


class UpstreamBusy(GatewayError):
    """No upstream slot (concurrency limit or connection pool) within the connect timeout."""

    status = 503
    default_code = "upstream_busy"


class CircuitOpen(GatewayError):
    """The circuit breaker is open: the upstream is not asked until the cool-down ends."""

    status = 503
    default_code = "upstream_circuit_open"


class ShuttingDown(GatewayError):
    """A request still running when the shutdown deadline passed."""

    status = 503
    default_code = "shutting_down"


class TokenUnavailable(GatewayError):
    status = 503
    default_code = "token_unavailable"


class CredentialsRejected(TokenUnavailable):
    default_code = "credentials_rejected"


class CredentialsRotated(TokenUnavailable):
    """A request keyed to one partner found the next partner's token (a rotation)."""

    default_code = "credentials_rotated"


class CredentialContention(TokenUnavailable):
    """Someone else logs in with our credentials and revoked the token; logins are slowed."""
    default_code = "credential_contention"


class StoreKeyMismatch(TokenUnavailable):
    """The fleet's token entry is live but sealed with another GATEWAY_STORE_KEY."""

    default_code = "store_key_mismatch"


class UpstreamError(GatewayError):
    status = 502
    default_code = "upstream_unreachable"
    kind: ClassVar[str] = "connect"  # the upstream_errors_total{kind} label
    #: False when the request certainly never left (no connection, TLS refused, connect
    #: timeout): what an Idempotency-Key's record depends on.
    sent: bool = True


class UpstreamUnreachable(UpstreamError):
    """No connection could be made: the request was certainly not sent."""

    sent = False


class UpstreamInvalidResponse(UpstreamError):
    default_code = "upstream_invalid_response"
    kind = "protocol"


class UpstreamTLSError(UpstreamError):
    default_code = "upstream_tls_error"
    kind = "tls"


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"
    kind = "timeout"


class DeadlineExceeded(UpstreamTimeout):
    """The request's own deadline passed before an attempt could be sent (a slow token
    renewal, back-off): a 504 for the caller, but not a fault of the upstream's."""

    kind = "deadline"


class AuthError(Exception):
    """A login or refresh call failed.

    ``ambiguous`` means the call may have reached Repairy (a timeout, a dropped connection):
    a refresh token sent in such a call must not be sent again.
    """

    def __init__(self, reason: AuthReason, message: str, *, status: int | None = None,
                 ambiguous: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason: AuthReason = reason
        self.message = message
        self.status = status
        self.ambiguous = ambiguous
        self.retry_after = retry_after
