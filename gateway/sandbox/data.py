"""Sandbox domain data and rules: seeded workshops, catalogs, availability, bookings, quotes
and service reminders, each validated the way Repairy's docs describe.

Handlers in ``sandbox.api`` call into :class:`SandboxData`; every rule violation is an
:class:`ApiError` carrying the HTTP status, a stable code and, for validation, per-field errors.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

JSON = dict[str, Any]

CATEGORIES = ("service", "tyres", "repair", "others")
MAX_AVAILABILITY_DAYS = 7
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
PHONE_RE = re.compile(r"^\+?[0-9 ()-]{6,20}$")

#: Booking status transitions; anything not listed is refused with 409.
TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"confirmed", "cancelled"}),
    "confirmed": frozenset({"in_progress", "cancelled", "no_show"}),
    "in_progress": frozenset({"completed"}),
    "completed": frozenset(),
    "cancelled": frozenset(),
    "no_show": frozenset(),
}
EDITABLE_BOOKING_FIELDS = frozenset({"startTime", "notes", "externalId", "customer", "car"})
FINAL_STATUSES = frozenset({"completed", "cancelled", "no_show"})


@dataclass
class ApiError(Exception):
    """A request the sandbox refuses: status, stable code, message, optional field errors."""

    status: int
    code: str
    message: str
    fields: dict[str, str] = field(default_factory=dict)

    def body(self) -> JSON:
        err: JSON = {"code": self.code, "message": self.message}
        if self.fields:
            err["fields"] = self.fields
        return {"success": False, "error": err}


def new_id() -> str:
    """A 24-hex id, shaped like Repairy's (Mongo ObjectId-like)."""
    return secrets.token_hex(12)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


_SEED_WORKSHOPS: list[JSON] = [
    {"id": "5f1a2b3c4d5e6f7a8b9c0d01", "name": "Harbour City Auto", "suburb": "Pyrmont",
     "state": "NSW", "timezone": "Australia/Sydney"},
    {"id": "5f1a2b3c4d5e6f7a8b9c0d02", "name": "Southside Tyres & Service", "suburb": "Moorabbin",
     "state": "VIC", "timezone": "Australia/Melbourne"},
    {"id": "5f1a2b3c4d5e6f7a8b9c0d03", "name": "River Road Mechanics", "suburb": "Milton",
     "state": "QLD", "timezone": "Australia/Brisbane"},
]
_SEED_SERVICES: list[tuple[str, str, int, int]] = [
    ("Logbook service", "service", 29900, 120),
    ("Basic service", "service", 18900, 90),
    ("Wheel alignment", "tyres", 8900, 45),
    ("Tyre rotation and balance", "tyres", 6900, 40),
    ("Brake pad replacement (front)", "repair", 34900, 90),
    ("Air-conditioning re-gas", "others", 15900, 60),
]


class SandboxData:
    """All resources of one sandbox, re-seeded by :meth:`reset`."""

    def __init__(self) -> None:
        self.workshops: dict[str, JSON] = {}
        self.catalog: dict[str, list[JSON]] = {}
        self.bookings: dict[str, JSON] = {}
        self.quotes: dict[str, JSON] = {}
        self.reminders: dict[str, JSON] = {}
        self.customers: dict[str, JSON] = {}
        self.reset()

    def reset(self) -> None:
        self.workshops = {w["id"]: dict(w) for w in _SEED_WORKSHOPS}
        self.catalog = {}
        for wi, wid in enumerate(self.workshops):
            items = []
            for si, (name, cat, cents, minutes) in enumerate(_SEED_SERVICES):
                items.append({
                    "_id": f"6a0000000000000000{wi:02x}{si:02x}00",
                    "workshopId": wid, "name": name, "category": cat,
                    "price": {"amount": cents + 1000 * wi, "currency": "AUD"},
                    "durationMinutes": minutes,
                })
            self.catalog[wid] = items
        self.bookings = {}
        self.quotes = {}
        self.reminders = {}
        self.customers = {
            "5f1a2b3c4d5e6f7a8b9c0e01": {"id": "5f1a2b3c4d5e6f7a8b9c0e01", "firstName": "Alex",
                                         "lastName": "Nguyen", "email": "alex@example.com",
                                         "phone": "+61400000001"},
        }

    # -- workshops -----------------------------------------------------------------------------
    def workshop(self, workshop_id: str) -> JSON:
        w = self.workshops.get(workshop_id)
        if w is None:
            raise ApiError(404, "workshop_not_found", f"no workshop {workshop_id}")
        return w

    def services(self, workshop_id: str) -> list[JSON]:
        self.workshop(workshop_id)
        return self.catalog[workshop_id]

    def availabilities(self, workshop_id: str, start: str | None, end: str | None) -> JSON:
        self.workshop(workshop_id)
        errors: dict[str, str] = {}
        d_from = _parse_date(start, "from", errors)
        d_to = _parse_date(end, "to", errors)
        if errors:
            raise ApiError(400, "invalid_date", "from and to must be dates (YYYY-MM-DD)", errors)
        assert d_from is not None and d_to is not None
        if d_to < d_from:
            raise ApiError(400, "invalid_date_range", "to is before from")
        if (d_to - d_from).days + 1 > MAX_AVAILABILITY_DAYS:
            raise ApiError(400, "date_range_too_long",
                           f"a range covers at most {MAX_AVAILABILITY_DAYS} days")
        taken = {b["startTime"] for b in self.bookings.values()
                 if b["workshopId"] == workshop_id and b["status"] not in FINAL_STATUSES}
        days = []
        day = d_from
        while day <= d_to:
            slots = []
            if day.weekday() != 6:  # closed on Sundays
                for hour in range(8, 17):
                    st = datetime.combine(day, time(hour)).isoformat()
                    # A deterministic sprinkle of already-booked slots.
                    free = st not in taken and (day.toordinal() + hour) % 5 != 0
                    slots.append({"startTime": st,
                                  "endTime": datetime.combine(day, time(hour + 1)).isoformat(),
                                  "available": free})
            days.append({"date": day.isoformat(), "slots": slots})
            day += timedelta(days=1)
        return {"workshopId": workshop_id, "from": d_from.isoformat(), "to": d_to.isoformat(),
                "days": days}

    # -- bookings ------------------------------------------------------------------------------
    def create_booking(self, partner_id: str, body: object) -> JSON:
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_body", "the body must be a JSON object")
        errors: dict[str, str] = {}
        wid = body.get("workshopId")
        if not isinstance(wid, str) or not wid:
            errors["workshopId"] = "required"
        elif wid not in self.workshops:
            errors["workshopId"] = "unknown workshop"
        start = body.get("startTime")
        if not isinstance(start, str) or _parse_datetime(start) is None:
            errors["startTime"] = "required, ISO-8601 date-time"
        _check_customer(body.get("customer"), errors, required=True)
        _check_car(body.get("car"), errors, required=True)
        services: list[JSON] = []
        if "serviceCategory" in body or "services" in body:  # the beta form
            cat = body.get("serviceCategory")
            if cat not in CATEGORIES:
                errors["serviceCategory"] = f"one of {', '.join(CATEGORIES)}"
            raw = body.get("services")
            if not isinstance(raw, list) or not raw:
                errors["services"] = "a non-empty list of {catalogId}"
            elif isinstance(wid, str) and wid in self.catalog:
                known = {s["_id"]: s for s in self.catalog[wid]}
                for i, item in enumerate(raw):
                    cid = item.get("catalogId") if isinstance(item, dict) else None
                    if cid not in known:
                        errors[f"services[{i}].catalogId"] = "not in this workshop's catalog"
                    else:
                        services.append({"catalogId": cid, "name": known[cid]["name"]})
        elif not isinstance(body.get("serviceType"), str) or not body.get("serviceType"):
            errors["serviceType"] = "required (or use serviceCategory + services)"
        if errors:
            raise ApiError(422, "validation_failed", "the booking has invalid fields", errors)
        customer = dict(body["customer"])
        customer_id = customer.get("id") or new_id()
        customer["id"] = customer_id
        self.customers[customer_id] = customer
        car = dict(body["car"])
        car.setdefault("id", new_id())
        car["customerId"] = customer_id
        now = _now_iso()
        booking: JSON = {
            "id": new_id(),
            "code": "RP" + secrets.token_hex(3).upper(),
            "status": "pending",
            "partnerId": partner_id,
            "workshopId": wid,
            "carId": car["id"],
            "customerId": customer_id,
            "externalId": body.get("externalId"),
            "startTime": start,
            "serviceType": body.get("serviceType"),
            "serviceCategory": body.get("serviceCategory"),
            "services": services,
            "notes": body.get("notes"),
            "car": car,
            "customer": customer,
            "createdAt": now,
            "updatedAt": now,
        }
        self.bookings[booking["id"]] = booking
        return booking

    def booking(self, partner_id: str, booking_id: str) -> JSON:
        b = self.bookings.get(booking_id)
        if b is None or b["partnerId"] != partner_id:  # other partners' bookings do not exist
            raise ApiError(404, "booking_not_found", f"no booking {booking_id}")
        return b

    def update_booking(self, partner_id: str, booking_id: str, body: object) -> JSON:
        b = self.booking(partner_id, booking_id)
        if not isinstance(body, dict) or not body:
            raise ApiError(400, "invalid_body", "the body must be a non-empty JSON object")
        errors = {k: "not editable" for k in body if k not in EDITABLE_BOOKING_FIELDS}
        if "startTime" in body and (not isinstance(body["startTime"], str)
                                    or _parse_datetime(body["startTime"]) is None):
            errors["startTime"] = "ISO-8601 date-time"
        if "customer" in body:
            _check_customer(body["customer"], errors, required=False)
        if "car" in body:
            _check_car(body["car"], errors, required=False)
        if errors:
            raise ApiError(422, "validation_failed", "the update has invalid fields", errors)
        if b["status"] in FINAL_STATUSES:
            raise ApiError(409, "booking_closed", f"a {b['status']} booking cannot be edited")
        for k, v in body.items():
            if k in ("customer", "car"):
                b[k] = {**b[k], **v}
            else:
                b[k] = v
        b["updatedAt"] = _now_iso()
        return b

    def change_status(self, partner_id: str, booking_id: str, status: str) -> JSON:
        b = self.booking(partner_id, booking_id)
        if status not in TRANSITIONS:
            raise ApiError(400, "unknown_status", f"unknown status {status!r}",
                           {"status": f"one of {', '.join(TRANSITIONS)}"})
        if status not in TRANSITIONS[b["status"]]:
            raise ApiError(409, "illegal_transition",
                           f"cannot go from {b['status']} to {status}")
        b["status"] = status
        b["updatedAt"] = _now_iso()
        return b

    # -- quotes and reminders ------------------------------------------------------------------
    def _for_workshop(self, body: object) -> tuple[JSON, dict[str, str]]:
        """Start validating a JSON object that names a workshop: (body, field errors)."""
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_body", "the body must be a JSON object")
        errors: dict[str, str] = {}
        if body.get("workshopId") not in self.workshops:
            errors["workshopId"] = "required, a known workshop"
        return body, errors

    def create_quote(self, partner_id: str, raw: object) -> JSON:
        body, errors = self._for_workshop(raw)
        wid = body.get("workshopId")
        if not isinstance(body.get("description"), str) or not body.get("description"):
            errors["description"] = "required"
        _check_customer(body.get("customer"), errors, required=True)
        _check_car(body.get("car"), errors, required=False)
        if errors:
            raise ApiError(422, "validation_failed", "the quote request has invalid fields",
                           errors)
        quote: JSON = {"id": new_id(), "status": "requested", "partnerId": partner_id,
                       "workshopId": wid, "description": body["description"],
                       "customer": body["customer"], "car": body.get("car"),
                       "createdAt": _now_iso()}
        self.quotes[quote["id"]] = quote
        return quote

    def send_reminder(self, partner_id: str, raw: object) -> JSON:
        body, errors = self._for_workshop(raw)
        wid = body.get("workshopId")
        cid, phone = body.get("customerId"), body.get("customerPhone")
        if cid is None and phone is None:
            errors["customerId"] = "customerId or customerPhone is required"
        elif cid is not None and cid not in self.customers:
            errors["customerId"] = "unknown customer"
        elif phone is not None and (not isinstance(phone, str) or not PHONE_RE.match(phone)):
            errors["customerPhone"] = "a phone number"
        if errors:
            raise ApiError(422, "validation_failed", "the reminder has invalid fields", errors)
        to = phone if phone is not None else self.customers[str(cid)]["phone"]
        reminder: JSON = {"id": new_id(), "status": "sent", "channel": "sms",
                          "partnerId": partner_id, "workshopId": wid, "customerId": cid,
                          "customerPhone": to, "sentAt": _now_iso()}
        self.reminders[reminder["id"]] = reminder
        return reminder

    def reminder(self, partner_id: str, reminder_id: str) -> JSON:
        r = self.reminders.get(reminder_id)
        if r is None or r["partnerId"] != partner_id:
            raise ApiError(404, "reminder_not_found", f"no service reminder {reminder_id}")
        return r


def _parse_date(value: str | None, name: str, errors: dict[str, str]) -> date | None:
    if not value:
        errors[name] = "required"
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        errors[name] = "not a date (YYYY-MM-DD)"
        return None


def _parse_datetime(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _check_customer(value: object, errors: dict[str, str], *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, dict):
        errors["customer"] = "required object"
        return
    for key in ("firstName", "phone", "email") if required else ():
        if not value.get(key):
            errors[f"customer.{key}"] = "required"
    email = value.get("email")
    if email is not None and (not isinstance(email, str) or not EMAIL_RE.match(email)):
        errors["customer.email"] = "not a valid email address"
    phone = value.get("phone")
    if phone is not None and (not isinstance(phone, str) or not PHONE_RE.match(phone)):
        errors["customer.phone"] = "not a valid phone number"


def _check_car(value: object, errors: dict[str, str], *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, dict):
        errors["car"] = "required object"
        return
    if required and not value.get("rego"):
        errors["car.rego"] = "required"
    year = value.get("year")
    if year is not None and (not isinstance(year, int) or not 1900 <= year <= 2100):
        errors["car.year"] = "a year"
