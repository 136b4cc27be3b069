"""The OCPI objects as JSON Schemas, written once from the spec's tables (OCPI 2.2.1; Bookings of 2.3.0).

An independent definition to hold our JSON against: written from the tables of
``mod_locations``, ``mod_tariffs``, ``mod_sessions``, ``mod_cdrs``, ``mod_commands``,
``credentials``, ``version_information_endpoint``, ``transport_and_format`` and
``mod_bookings`` of the ``ocpi/ocpi`` repository, not from our Structs. (A kept
Python OCPI package with such models pins pydantic 1 and an httpx whose h11 clashes
with the test extra's selenium, so it does not install cleanly beside it.)
Required fields are the tables' cardinality 1 and +; enums are the tables' values.
"""

from __future__ import annotations

from typing import Any

import jsonschema

DATETIME = {"type": "string", "maxLength": 25, "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?$"}


def cistring(n: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": n, "pattern": r"^[\x20-\x7e]*$"}


def string(n: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": n}


def enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    props = {**required, **(optional or {})}
    return {"type": "object", "required": list(required), "properties": props}


def array(item: dict[str, Any], min_items: int = 0) -> dict[str, Any]:
    return {"type": "array", "items": item, "minItems": min_items}


NUMBER = {"type": "number"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
URL = string(255)
ROLE = enum("CPO", "EMSP", "HUB", "NAP", "NSP", "OTHER", "SCSP")
TOKEN_TYPE = enum("AD_HOC_USER", "APP_USER", "OTHER", "RFID")
DISPLAY_TEXT = obj({"language": string(2), "text": string(512)})
GEO = obj(
    {
        "latitude": {"type": "string", "maxLength": 10, "pattern": r"^-?[0-9]{1,2}\.[0-9]{5,7}$"},
        "longitude": {"type": "string", "maxLength": 11, "pattern": r"^-?[0-9]{1,3}\.[0-9]{5,7}$"},
    }
)
CONNECTOR_TYPE = enum(
    "CHADEMO", "CHAOJI", "DOMESTIC_A", "DOMESTIC_B", "DOMESTIC_C", "DOMESTIC_D", "DOMESTIC_E", "DOMESTIC_F",
    "DOMESTIC_G", "DOMESTIC_H", "DOMESTIC_I", "DOMESTIC_J", "DOMESTIC_K", "DOMESTIC_L", "DOMESTIC_M", "DOMESTIC_N",
    "DOMESTIC_O", "GBT_AC", "GBT_DC", "IEC_60309_2_single_16", "IEC_60309_2_three_16", "IEC_60309_2_three_32",
    "IEC_60309_2_three_64", "IEC_62196_T1", "IEC_62196_T1_COMBO", "IEC_62196_T2", "IEC_62196_T2_COMBO",
    "IEC_62196_T3A", "IEC_62196_T3C", "NEMA_5_20", "NEMA_6_30", "NEMA_6_50", "NEMA_10_30", "NEMA_10_50",
    "NEMA_14_30", "NEMA_14_50", "PANTOGRAPH_BOTTOM_UP", "PANTOGRAPH_TOP_DOWN", "TESLA_R", "TESLA_S",
)  # fmt: skip
FORMAT = enum("SOCKET", "CABLE")
POWER_TYPE = enum("AC_1_PHASE", "AC_2_PHASE", "AC_2_PHASE_SPLIT", "AC_3_PHASE", "DC")
CAPABILITY = enum(
    "CHARGING_PROFILE_CAPABLE", "CHARGING_PREFERENCES_CAPABLE", "CHIP_CARD_SUPPORT", "CONTACTLESS_CARD_SUPPORT",
    "CREDIT_CARD_PAYABLE", "DEBIT_CARD_PAYABLE", "PED_TERMINAL", "REMOTE_START_STOP_CAPABLE", "RESERVABLE",
    "RFID_READER", "START_SESSION_CONNECTOR_REQUIRED", "TOKEN_GROUP_CAPABLE", "UNLOCK_CAPABLE",
)  # fmt: skip

CONNECTOR = obj(
    {
        "id": cistring(36),
        "standard": CONNECTOR_TYPE,
        "format": FORMAT,
        "power_type": POWER_TYPE,
        "max_voltage": INT,
        "max_amperage": INT,
        "last_updated": DATETIME,
    },
    {"max_electric_power": INT, "tariff_ids": array(cistring(36)), "terms_and_conditions": URL},
)
EVSE = obj(
    {
        "uid": cistring(36),
        "status": enum(
            "AVAILABLE", "BLOCKED", "CHARGING", "INOPERATIVE", "OUTOFORDER", "PLANNED", "REMOVED", "RESERVED", "UNKNOWN"
        ),
        "connectors": array(CONNECTOR, 1),
        "last_updated": DATETIME,
    },
    {
        "evse_id": {"type": "string", "maxLength": 48, "pattern": r"^[A-Z]{2}\*?[A-Z0-9]{3}\*?E[A-Z0-9*]{1,30}$"},
        "capabilities": array(CAPABILITY),
        "coordinates": GEO,
        "floor_level": string(4),
        "physical_reference": string(16),
    },
)
LOCATION = obj(
    {
        "country_code": cistring(2),
        "party_id": cistring(3),
        "id": cistring(36),
        "publish": BOOL,
        "address": string(45),
        "city": string(45),
        "country": string(3),
        "coordinates": GEO,
        "time_zone": string(255),
        "last_updated": DATETIME,
    },
    {
        "name": string(255),
        "postal_code": string(10),
        "state": string(20),
        "evses": array(EVSE),
        "operator": obj({"name": string(100)}),
    },
)
PRICE_COMPONENT = obj(
    {"type": enum("ENERGY", "FLAT", "PARKING_TIME", "TIME"), "price": NUMBER, "step_size": INT}, {"vat": NUMBER}
)
TARIFF = obj(
    {
        "country_code": cistring(2),
        "party_id": cistring(3),
        "id": cistring(36),
        "currency": string(3),
        "elements": array(obj({"price_components": array(PRICE_COMPONENT, 1)}), 1),
        "last_updated": DATETIME,
    },
    {"type": enum("AD_HOC_PAYMENT", "PROFILE_CHEAP", "PROFILE_FAST", "PROFILE_GREEN", "REGULAR")},
)
PRICE = obj({"excl_vat": NUMBER}, {"incl_vat": NUMBER})
CDR_TOKEN = obj(
    {
        "country_code": cistring(2),
        "party_id": cistring(3),
        "uid": cistring(36),
        "type": TOKEN_TYPE,
        "contract_id": cistring(36),
    }
)
AUTH_METHOD = enum("AUTH_REQUEST", "COMMAND", "WHITELIST")
SESSION = obj(
    {
        "country_code": cistring(2),
        "party_id": cistring(3),
        "id": cistring(36),
        "start_date_time": DATETIME,
        "kwh": NUMBER,
        "cdr_token": CDR_TOKEN,
        "auth_method": AUTH_METHOD,
        "location_id": cistring(36),
        "evse_uid": cistring(36),
        "connector_id": cistring(36),
        "currency": string(3),
        "status": enum("ACTIVE", "COMPLETED", "INVALID", "PENDING", "RESERVATION"),
        "last_updated": DATETIME,
    },
    {"end_date_time": DATETIME, "authorization_reference": cistring(36), "total_cost": PRICE},
)
CDR_DIMENSION = obj(
    {
        "type": enum(
            "CURRENT", "ENERGY", "ENERGY_EXPORT", "ENERGY_IMPORT", "MAX_CURRENT", "MIN_CURRENT", "MAX_POWER",
            "MIN_POWER", "PARKING_TIME", "POWER", "RESERVATION_TIME", "STATE_OF_CHARGE", "TIME",
        ),
        "volume": NUMBER,
    }
)  # fmt: skip
CDR = obj(
    {
        "country_code": cistring(2),
        "party_id": cistring(3),
        "id": cistring(39),
        "start_date_time": DATETIME,
        "end_date_time": DATETIME,
        "cdr_token": CDR_TOKEN,
        "auth_method": AUTH_METHOD,
        "cdr_location": obj(
            {
                "id": cistring(36),
                "address": string(45),
                "city": string(45),
                "country": string(3),
                "coordinates": GEO,
                "evse_uid": cistring(36),
                "evse_id": cistring(48),
                "connector_id": cistring(36),
                "connector_standard": CONNECTOR_TYPE,
                "connector_format": FORMAT,
                "connector_power_type": POWER_TYPE,
            },
            {"name": string(255), "postal_code": string(10)},
        ),
        "currency": string(3),
        "charging_periods": array(
            obj({"start_date_time": DATETIME, "dimensions": array(CDR_DIMENSION, 1)}, {"tariff_id": cistring(36)}), 1
        ),
        "total_cost": PRICE,
        "total_energy": NUMBER,
        "total_time": NUMBER,
        "last_updated": DATETIME,
    },
    {"session_id": cistring(36), "authorization_reference": cistring(36), "tariffs": array(TARIFF)},
)
COMMAND_RESPONSE = obj(
    {"result": enum("NOT_SUPPORTED", "REJECTED", "ACCEPTED", "UNKNOWN_SESSION"), "timeout": INT},
    {"message": array(DISPLAY_TEXT)},
)
COMMAND_RESULT = obj(
    {
        "result": enum(
            "ACCEPTED", "CANCELED_RESERVATION", "EVSE_OCCUPIED", "EVSE_INOPERATIVE", "FAILED", "NOT_SUPPORTED",
            "REJECTED", "TIMEOUT", "UNKNOWN_RESERVATION",
        )
    },
    {"message": array(DISPLAY_TEXT)},
)  # fmt: skip
CREDENTIALS = obj(
    {
        "token": string(64),
        "url": URL,
        "roles": array(
            obj(
                {
                    "role": ROLE,
                    "business_details": obj({"name": string(100)}, {"website": URL}),
                    "party_id": cistring(3),
                    "country_code": cistring(2),
                }
            ),
            1,
        ),
    }
)
VERSIONS = array(obj({"version": enum("2.0", "2.1", "2.1.1", "2.2", "2.2.1", "2.3.0"), "url": URL}), 1)
VERSION_DETAILS = obj(
    {
        "version": enum("2.2.1"),
        "endpoints": array(obj({"identifier": string(50), "role": enum("SENDER", "RECEIVER"), "url": URL}), 1),
    }
)
TIMESLOT = obj({"start_from": DATETIME, "end_before": DATETIME}, {"min_power": NUMBER, "max_power": NUMBER})
BOOKING_TERMS = obj(
    {"change_until_minutes": NUMBER, "cancel_until_minutes": NUMBER, "supported_access_methods": array(string(20), 1)},
    {
        "RFID_auth_required": BOOL,
        "token_groups_supported": BOOL,
        "remote_auth_supported": BOOL,
        "change_not_allowed": BOOL,
        "early_start_allowed": BOOL,
        "early_start_time": NUMBER,
        "noshow_timeout": NUMBER,
        "noshow_fee": BOOL,
        "late_stop_allowed": BOOL,
        "overlapping_bookings_allowed": BOOL,
        "booking_terms": URL,
    },
)
CALENDAR = obj(
    {
        "id": cistring(36),
        "begin_from": DATETIME,
        "end_before": DATETIME,
        "available_timeslots": array(TIMESLOT, 1),
        "last_updated": DATETIME,
    },
    {"step_size": INT},
)
BOOKING_LOCATION = obj(
    {
        "country_code": cistring(2),
        "party_id": cistring(3),
        "id": cistring(36),
        "location_id": cistring(36),
        "last_updated": DATETIME,
    },
    {
        "evse_uid": cistring(36),
        "connector_id": cistring(36),
        "bookable": obj({"reservation_required": BOOL}, {"ad_hoc": NUMBER}),
        "tariff_id": array(cistring(36)),
        "booking_terms": array(BOOKING_TERMS),
        "calendars": array(CALENDAR),
    },
)
RESERVATION_STATUS = enum("PENDING", "RESERVED", "CANCELED", "FAILED", "NO_SHOW", "FULFILLED", "REJECTED", "UNKNOWN")
BOOKING = obj(
    {
        "id": cistring(36),
        "country_code": cistring(2),
        "party_id": cistring(3),
        "request_id": cistring(36),
        "location_id": cistring(36),
        "period": TIMESLOT,
        "reservation_status": RESERVATION_STATUS,
        "authorization_reference": cistring(36),
        "booking_terms": BOOKING_TERMS,
        "booking_requests": array(
            obj(
                {
                    "request_status": enum("PENDING", "ACCEPTED", "DECLINED", "FAILED"),
                    "booking_request": {"type": "object"},
                    "request_received": DATETIME,
                }
            ),
            1,
        ),
        "last_updated": DATETIME,
    },
    {
        "evse_uid": cistring(36),
        "connector_id": cistring(36),
        "booking_tokens": array(CDR_TOKEN),
        "tariff_id": array(cistring(36)),
        "canceled": obj(
            {
                "cancellation_reason": enum(
                    "POWER_OUTAGE", "BROKEN_CHARGER", "FULL", "BLOCKED", "TRAFFIC", "BROKEN_VEHICLE", "NO_CANCELED",
                    "UNKNOWN",
                ),
                "who_canceled": ROLE,
            }
        ),
        "access_methods": array(obj({"location_access": string(20)}, {"value": string(255)})),
    },
)  # fmt: skip
ENVELOPE = obj({"status_code": INT, "timestamp": DATETIME}, {"status_message": string(255), "data": {}})


def check(schema: dict[str, Any], value: Any) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``value`` fits the spec's table."""
    jsonschema.validate(value, schema)
