"""The OpenAPI 3.1 description of the Repairy Partner API as the sandbox implements it.

Served by the sandbox at :data:`OPENAPI_PATH` (no token needed; through a gateway it is proxied
like any path, so the demo serves it too) and committed as ``docs/openapi.json``. Paths,
request bodies with examples, the sandbox's answers and error envelope, and the gateway's own
error body, so a client can be generated and body shapes need not be guessed from 422 errors.
The test suite checks real sandbox answers against it. Built from the sandbox's own rules
(categories, status transitions, editable fields) so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Final

from gateway import __version__
from gateway.sandbox.data import CATEGORIES, EDITABLE_BOOKING_FIELDS, TRANSITIONS

OPENAPI_PATH: Final = "/openapi.json"
JSON = dict[str, Any]

_ID = {"type": "string", "pattern": "^[0-9a-f]{24}$", "examples": ["5f1a2b3c4d5e6f7a8b9c0d01"]}
_DATETIME = {"type": "string", "examples": ["2026-12-01T09:00:00+11:00"],
             "description": "ISO-8601 date-time"}
_WORKSHOP = "5f1a2b3c4d5e6f7a8b9c0d01"


def _ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def _envelope(data: JSON) -> JSON:
    return {"type": "object", "required": ["success", "data"],
            "properties": {"success": {"const": True}, "data": data}}


def _ok(schema: JSON, description: str) -> JSON:
    return {"description": description,
            "content": {"application/json": {"schema": _envelope(schema)}}}


def _errors(*statuses: int) -> JSON:
    reasons = {400: "Malformed request (invalid JSON, bad dates, unknown status)",
               401: "Missing, unknown, expired or revoked access token",
               403: "X-Partner-ID missing or not the token's partner",
               404: "No such resource (other partners' resources do not exist)",
               409: "Not allowed in the resource's current state",
               422: "Validation failed: error.fields names each bad field"}
    return {str(s): {"description": reasons[s] + " (or an answer the gateway made itself)",
                     "content": {"application/json": {"schema": _EITHER}}} for s in statuses}


#: An error answer: Repairy's envelope, or one the gateway made (then without ``success``).
_EITHER: Final = {"anyOf": [_ref("ErrorEnvelope"), _ref("GatewayError")]}
_GATEWAY_ERROR = {"description": "An answer made by repairy-gateway itself (the "
                  "X-Repairy-Gateway-Error header names its code): see docs/calling.md",
                  "headers": {"X-Repairy-Gateway-Error": {"schema": {"type": "string"}}},
                  "content": {"application/json": {"schema": _ref("GatewayError")}}}
#: What the gateway answers itself on every route, beside the route's own answers.
_GATEWAY_STATUSES: Final = {
    "429": "A gateway rate or concurrency limit (Retry-After)",
    "502": "Repairy unreachable, its answer broken, or an Idempotency-Key's outcome unknown",
    "503": "No usable token, the circuit breaker open, or the gateway busy (Retry-After)",
    "504": "Repairy did not answer in time"}


def _op(summary: str, responses: JSON, *, tag: str, body: JSON | None = None,
        params: list[JSON] | None = None, auth: bool = True) -> JSON:
    gateway = {status: {**_GATEWAY_ERROR, "description": why,
                        "content": {"application/json": {"schema": _EITHER}}}
               for status, why in _GATEWAY_STATUSES.items()}
    op: JSON = {"summary": summary, "tags": [tag],
                "responses": {**gateway, **responses, "default": _GATEWAY_ERROR}}
    if body is not None:
        op["requestBody"] = body
    if params:
        op["parameters"] = params
    if auth:
        op["responses"].update(_errors(401, 403))
    else:
        op["security"] = []
    return op


def _json_body(schema: JSON, examples: JSON) -> JSON:
    return {"required": True, "content": {"application/json": {
        "schema": schema, "examples": {k: {"value": v} for k, v in examples.items()}}}}


def _path_param(name: str, description: str, schema: JSON | None = None) -> JSON:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema or {"type": "string"}}


_CUSTOMER_EXAMPLE = {"firstName": "Sam", "lastName": "Lee", "email": "sam@example.com",
                     "phone": "+61400000002"}
_CAR_EXAMPLE = {"rego": "ABC123", "make": "Toyota", "model": "Corolla", "year": 2019}


def _schemas() -> JSON:
    customer = {"type": "object", "properties": {
        "id": _ID, "firstName": {"type": "string"}, "lastName": {"type": "string"},
        "email": {"type": "string", "format": "email"},
        "phone": {"type": "string", "pattern": r"^\+?[0-9 ()-]{6,20}$"}}}
    car = {"type": "object", "properties": {
        "id": _ID, "customerId": _ID, "rego": {"type": "string"}, "make": {"type": "string"},
        "model": {"type": "string"}, "year": {"type": "integer", "minimum": 1900,
                                              "maximum": 2100}}}
    statuses = list(TRANSITIONS)
    return {
        "ErrorEnvelope": {"type": "object", "required": ["success", "error"], "properties": {
            "success": {"const": False},
            "error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string", "examples": ["validation_failed"]},
                "message": {"type": "string"},
                "fields": {"type": "object", "additionalProperties": {"type": "string"},
                           "description": "Per-field problems (422)"}}}}},
        "GatewayError": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string", "examples": ["token_unavailable"]},
                "message": {"type": "string"},
                "request_id": {"type": "string"}}}}},
        "AuthGrant": {"type": "object", "required": ["accessToken", "tokenType", "expiresIn"],
                      "properties": {
                          "accessToken": {"type": "string"},
                          "refreshToken": {"type": ["string", "null"]},
                          "tokenType": {"const": "Bearer"},
                          "expiresIn": {"type": "number", "description": "seconds"},
                          "refreshExpiresIn": {"type": ["number", "null"],
                                               "description": "seconds"}}},
        "CatalogItem": {"type": "object",
                        "required": ["_id", "workshopId", "name", "category", "price"],
                        "properties": {
                            "_id": _ID, "workshopId": _ID, "name": {"type": "string"},
                            "category": {"enum": list(CATEGORIES)},
                            "price": {"type": "object", "required": ["amount", "currency"],
                                      "properties": {"amount": {"type": "integer",
                                                                "description": "cents"},
                                                     "currency": {"type": "string"}}},
                            "durationMinutes": {"type": "integer"}}},
        "Availability": {"type": "object", "required": ["workshopId", "from", "to", "days"],
                         "properties": {
                             "workshopId": _ID, "from": {"type": "string", "format": "date"},
                             "to": {"type": "string", "format": "date"},
                             "days": {"type": "array", "items": {
                                 "type": "object", "required": ["date", "slots"],
                                 "properties": {
                                     "date": {"type": "string", "format": "date"},
                                     "slots": {"type": "array", "items": {
                                         "type": "object",
                                         "required": ["startTime", "endTime", "available"],
                                         "properties": {"startTime": {"type": "string"},
                                                        "endTime": {"type": "string"},
                                                        "available": {"type": "boolean"}}}}}}}}},
        "Customer": customer,
        "Car": car,
        "BookingCreate": {
            "type": "object",
            "required": ["workshopId", "startTime", "customer", "car"],
            "properties": {
                "workshopId": _ID, "startTime": _DATETIME,
                "externalId": {"type": "string", "description": "Your own reference: find a "
                               "booking by it when an outcome is unknown"},
                "customer": {**customer, "required": ["firstName", "phone", "email"]},
                "car": {**car, "required": ["rego"]},
                "serviceType": {"type": "string", "description": "The legacy form"},
                "serviceCategory": {"enum": list(CATEGORIES),
                                    "description": "The beta form, with services"},
                "services": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["catalogId"],
                    "properties": {"catalogId": _ID}}},
                "notes": {"type": "string"}},
            "oneOf": [{"required": ["serviceType"]},
                      {"required": ["serviceCategory", "services"]}]},
        "BookingUpdate": {"type": "object", "minProperties": 1, "additionalProperties": False,
                          "properties": {name: ({"type": "string"} if name not in (
                              "customer", "car") else _ref(name.capitalize()))
                              for name in sorted(EDITABLE_BOOKING_FIELDS)}},
        "Booking": {"type": "object",
                    "required": ["id", "code", "status", "partnerId", "workshopId", "startTime",
                                 "customer", "car", "createdAt", "updatedAt"],
                    "properties": {
                        "id": _ID, "code": {"type": "string", "examples": ["RP1A2B3C"]},
                        "status": {"enum": statuses}, "partnerId": {"type": "string"},
                        "workshopId": _ID, "carId": _ID, "customerId": _ID,
                        "externalId": {"type": ["string", "null"]}, "startTime": _DATETIME,
                        "serviceType": {"type": ["string", "null"]},
                        "serviceCategory": {"type": ["string", "null"]},
                        "services": {"type": "array", "items": {
                            "type": "object", "properties": {"catalogId": _ID,
                                                             "name": {"type": "string"}}}},
                        "notes": {"type": ["string", "null"]},
                        "customer": customer, "car": car,
                        "createdAt": {"type": "string"}, "updatedAt": {"type": "string"}}},
        "QuoteRequest": {"type": "object", "required": ["workshopId", "description", "customer"],
                         "properties": {"workshopId": _ID, "description": {"type": "string"},
                                        "customer": {**customer,
                                                     "required": ["firstName", "phone",
                                                                  "email"]},
                                        "car": car}},
        "Quote": {"type": "object", "required": ["id", "status", "workshopId", "description"],
                  "properties": {"id": _ID, "status": {"const": "requested"},
                                 "partnerId": {"type": "string"}, "workshopId": _ID,
                                 "description": {"type": "string"}, "customer": customer,
                                 "car": {"anyOf": [car, {"type": "null"}]},
                                 "createdAt": {"type": "string"}}},
        "ReminderRequest": {"type": "object", "required": ["workshopId"],
                            "properties": {"workshopId": _ID, "customerId": _ID,
                                           "customerPhone": {"type": "string"}},
                            "anyOf": [{"required": ["customerId"]},
                                      {"required": ["customerPhone"]}]},
        "Reminder": {"type": "object", "required": ["id", "status", "channel", "workshopId"],
                     "properties": {"id": _ID, "status": {"const": "sent"},
                                    "channel": {"const": "sms"},
                                    "partnerId": {"type": "string"}, "workshopId": _ID,
                                    "customerId": {"anyOf": [_ID, {"type": "null"}]},
                                    "customerPhone": {"type": "string"},
                                    "sentAt": {"type": "string"}}},
    }


def openapi() -> JSON:
    """The document (a fresh dict each call)."""
    workshop = _path_param("workshopId", "A workshop's id", _ID)
    booking = _path_param("bookingId", "A booking's id", _ID)
    booking_example = {"workshopId": _WORKSHOP, "startTime": "2026-12-01T09:00:00+11:00",
                       "externalId": "partner-ref-1", "customer": _CUSTOMER_EXAMPLE,
                       "car": _CAR_EXAMPLE}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Repairy Partner API (as the repairy-gateway sandbox implements it)",
            "version": f"sandbox-{__version__}",
            "description": (
                "The API the sandbox implements, modelled on Repairy's partner documentation. "
                "Called directly, every resource needs `Authorization: Bearer <access token>` "
                "and `X-Partner-ID`; called through repairy-gateway, send neither (the gateway "
                "injects both) and the auth endpoints are not reachable. Answers are wrapped "
                "as {success, data} or {success: false, error}; answers the gateway makes "
                "itself are {error: {code, message, request_id}} with an "
                "X-Repairy-Gateway-Error header.")},
        "servers": [{"url": "/"}],
        "security": [{"bearer": [], "partnerId": []}],
        "tags": [{"name": "auth"}, {"name": "workshops"}, {"name": "bookings"},
                 {"name": "quotes"}, {"name": "reminders"}],
        "paths": {
            "/auth/token": {"post": _op(
                "Log in with the App Key and App Secret (JSON or form body)",
                {"200": _ok(_ref("AuthGrant"), "A new access token and refresh token"),
                 **_errors(400, 401)}, tag="auth", auth=False,
                body={"required": True, "content": {
                    "application/json": {"schema": {
                        "type": "object", "required": ["appKey", "appSecret"],
                        "properties": {"appKey": {"type": "string"},
                                       "appSecret": {"type": "string"}}},
                        "examples": {"login": {"value": {"appKey": "sandbox-app-key",
                                                         "appSecret": "sandbox-app-secret"}}}},
                    "application/x-www-form-urlencoded": {"schema": {
                        "type": "object", "properties": {"appKey": {"type": "string"},
                                                         "appSecret": {"type": "string"}}}}}})},
            "/auth/refresh": {"post": {**_op(
                "Refresh: the still-valid access token as Bearer, the refresh token in the body",
                {"200": _ok(_ref("AuthGrant"), "A new access token (and refresh token)"),
                 **_errors(400, 401)}, tag="auth", auth=False,
                body=_json_body({"type": "object", "required": ["refreshToken"],
                                 "properties": {"refreshToken": {"type": "string"}}},
                                {"refresh": {"refreshToken": "<refresh token>"}})),
                "security": [{"bearer": []}]}},
            "/workshops/{workshopId}/services": {"get": _op(
                "A workshop's service catalog",
                {"200": _ok({"type": "array", "items": _ref("CatalogItem")}, "The catalog"),
                 **_errors(404)}, tag="workshops", params=[workshop])},
            "/workshops/{workshopId}/availabilities": {"get": _op(
                "Free and taken one-hour slots, at most 7 days",
                {"200": _ok(_ref("Availability"), "Slots by day"), **_errors(400, 404)},
                tag="workshops", params=[workshop, *[
                    {"name": name, "in": "query", "required": True,
                     "schema": {"type": "string", "format": "date"},
                     "example": "2026-12-01"} for name in ("from", "to")]])},
            "/bookings": {"post": _op(
                "Create a booking (send Idempotency-Key through the gateway to retry safely)",
                {"201": _ok(_ref("Booking"), "The booking"), **_errors(400, 422)},
                tag="bookings", params=[{
                    "name": "Idempotency-Key", "in": "header", "required": False,
                    "description": "Honoured by repairy-gateway (not by Repairy): a repeat "
                                   "gets the first answer", "schema": {"type": "string",
                                                                        "maxLength": 255}}],
                body=_json_body(_ref("BookingCreate"), {
                    "legacy": {**booking_example, "serviceType": "Logbook service"},
                    "catalog": {**booking_example, "serviceCategory": "service",
                                "services": [{"catalogId": "6a0000000000000000000000"}]}}))},
            "/bookings/{bookingId}": {
                "get": _op("A booking", {"200": _ok(_ref("Booking"), "The booking"),
                                         **_errors(404)}, tag="bookings", params=[booking]),
                "put": _op("Update a booking's editable fields",
                           {"200": _ok(_ref("Booking"), "The updated booking"),
                            **_errors(400, 404, 409, 422)}, tag="bookings", params=[booking],
                           body=_json_body(_ref("BookingUpdate"), {
                               "reschedule": {"startTime": "2026-12-02T10:00:00+11:00"}}))},
            "/bookings/{bookingId}/{status}": {"post": _op(
                "Change a booking's status (only the allowed transitions: "
                + "; ".join(f"{a} -> {', '.join(sorted(b)) or 'none'}"
                            for a, b in TRANSITIONS.items()) + ")",
                {"200": _ok(_ref("Booking"), "The booking in its new status"),
                 **_errors(400, 404, 409)}, tag="bookings",
                params=[booking, _path_param("status", "The new status",
                                             {"enum": list(TRANSITIONS)})])},
            "/quotes": {"post": _op(
                "Request a quote", {"201": _ok(_ref("Quote"), "The quote request"),
                                    **_errors(400, 422)}, tag="quotes",
                body=_json_body(_ref("QuoteRequest"), {"quote": {
                    "workshopId": _WORKSHOP, "description": "Front brakes squeal",
                    "customer": _CUSTOMER_EXAMPLE, "car": _CAR_EXAMPLE}}))},
            "/reminders/services": {"post": _op(
                "Send a service reminder (SMS)", {"201": _ok(_ref("Reminder"), "Sent"),
                                                  **_errors(400, 422)}, tag="reminders",
                body=_json_body(_ref("ReminderRequest"), {"byPhone": {
                    "workshopId": _WORKSHOP, "customerPhone": "+61400000003"}}))},
            "/reminders/services/{reminderId}": {"get": _op(
                "A service reminder", {"200": _ok(_ref("Reminder"), "The reminder"),
                                       **_errors(404)}, tag="reminders",
                params=[_path_param("reminderId", "A reminder's id", _ID)])},
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "The access token (injected by the gateway)"},
                "partnerId": {"type": "apiKey", "in": "header", "name": "X-Partner-ID",
                              "description": "The partner's id (injected by the gateway)"}},
            "schemas": _schemas()},
    }
