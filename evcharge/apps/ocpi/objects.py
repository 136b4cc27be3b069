"""The OCPI objects the edge sends and accepts, as msgspec Structs (OCPI 2.2.1, and the 2.3.0 Bookings module).

Field names are OCPI's. Objects we send leave out what is None (``omit_defaults``);
objects we accept ignore fields they do not know, as OCPI asks of every receiver.
Times we send are strings in OCPI's form (``ocpi_time``); times we accept are
``datetime``: one without an offset is UTC, as OCPI says (``utc``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

CiString2 = Annotated[str, msgspec.Meta(min_length=2, max_length=2)]
CiString3 = Annotated[str, msgspec.Meta(min_length=3, max_length=3)]
CiString36 = Annotated[str, msgspec.Meta(min_length=1, max_length=36)]
Url = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
TokenString = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]

Role = Literal["CPO", "EMSP", "HUB", "NAP", "NSP", "OTHER", "SCSP"]
TokenType = Literal["AD_HOC_USER", "APP_USER", "OTHER", "RFID"]
WhitelistType = Literal["ALWAYS", "ALLOWED", "ALLOWED_OFFLINE", "NEVER"]
EvseStatus = Literal[
    "AVAILABLE", "BLOCKED", "CHARGING", "INOPERATIVE", "OUTOFORDER", "PLANNED", "REMOVED", "RESERVED", "UNKNOWN"
]
CommandType = Literal["CANCEL_RESERVATION", "RESERVE_NOW", "START_SESSION", "STOP_SESSION", "UNLOCK_CONNECTOR"]
CommandResponseType = Literal["NOT_SUPPORTED", "REJECTED", "ACCEPTED", "UNKNOWN_SESSION"]
CommandResultType = Literal[
    "ACCEPTED",
    "CANCELED_RESERVATION",
    "EVSE_OCCUPIED",
    "EVSE_INOPERATIVE",
    "FAILED",
    "NOT_SUPPORTED",
    "REJECTED",
    "TIMEOUT",
    "UNKNOWN_RESERVATION",
]
AllowedType = Literal["ALLOWED", "BLOCKED", "EXPIRED", "NO_CREDIT", "NOT_ALLOWED"]
ReservationStatus = Literal["PENDING", "RESERVED", "CANCELED", "FAILED", "NO_SHOW", "FULFILLED", "REJECTED", "UNKNOWN"]
RequestStatus = Literal["PENDING", "ACCEPTED", "DECLINED", "FAILED"]
CanceledReason = Literal[
    "POWER_OUTAGE", "BROKEN_CHARGER", "FULL", "BLOCKED", "TRAFFIC", "BROKEN_VEHICLE", "NO_CANCELED", "UNKNOWN"
]


def ocpi_time(when: datetime) -> str:
    """OCPI's DateTime: UTC, whole seconds, with ``Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc(when: datetime) -> datetime:
    """A time as OCPI means it: one without an offset is UTC."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


class Sent(msgspec.Struct, omit_defaults=True, kw_only=True):
    """An object we send: fields left None are not sent."""


# --- versions and credentials ------------------------------------------------------------


class Version(msgspec.Struct):
    version: str
    url: str


class Endpoint(msgspec.Struct):
    identifier: str
    role: Literal["SENDER", "RECEIVER"]
    url: str


class VersionDetails(msgspec.Struct):
    version: str
    endpoints: list[Endpoint]


class BusinessDetails(Sent, kw_only=True):
    name: Annotated[str, msgspec.Meta(max_length=100)]
    website: str | None = None


class CredentialsRole(Sent, kw_only=True):
    role: Role
    business_details: BusinessDetails
    party_id: CiString3
    country_code: CiString2


class Credentials(Sent, kw_only=True):
    token: TokenString
    url: Url
    roles: Annotated[list[CredentialsRole], msgspec.Meta(min_length=1)]


# --- locations and tariffs -----------------------------------------------------------------


class GeoLocation(Sent, kw_only=True):
    latitude: str
    longitude: str


class Connector(Sent, kw_only=True):
    id: str
    standard: str
    format: Literal["SOCKET", "CABLE"]
    power_type: Literal["AC_1_PHASE", "AC_2_PHASE", "AC_2_PHASE_SPLIT", "AC_3_PHASE", "DC"]
    max_voltage: int
    max_amperage: int
    max_electric_power: int | None = None
    tariff_ids: list[str] | None = None
    last_updated: str


class Evse(Sent, kw_only=True):
    uid: str
    evse_id: str | None = None
    status: EvseStatus
    capabilities: list[str] | None = None
    connectors: list[Connector]
    coordinates: GeoLocation | None = None
    last_updated: str


class OperatorDetails(Sent, kw_only=True):
    name: str


class Location(Sent, kw_only=True):
    country_code: str
    party_id: str
    id: str
    publish: bool
    name: str | None = None
    address: str
    city: str
    country: str
    coordinates: GeoLocation
    evses: list[Evse] | None = None
    operator: OperatorDetails | None = None
    time_zone: str
    last_updated: str


class EvseStatusPatch(Sent, kw_only=True):
    """What a status change pushes: the EVSE's status and when it changed."""

    status: EvseStatus
    last_updated: str


class PriceComponent(Sent, kw_only=True):
    type: Literal["ENERGY", "FLAT", "PARKING_TIME", "TIME"]
    price: float
    step_size: int


class TariffElement(Sent, kw_only=True):
    price_components: list[PriceComponent]


class Tariff(Sent, kw_only=True):
    country_code: str
    party_id: str
    id: str
    currency: str
    type: str | None = None
    elements: list[TariffElement]
    last_updated: str


# --- tokens, sessions, CDRs ------------------------------------------------------------------


class Token(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An eMSP's token, as it pushes it to us (and as commands carry it)."""

    country_code: CiString2
    party_id: CiString3
    uid: CiString36
    type: TokenType
    contract_id: CiString36
    visual_number: str | None = None
    issuer: Annotated[str, msgspec.Meta(max_length=64)]
    group_id: str | None = None
    valid: bool
    whitelist: WhitelistType
    language: str | None = None
    last_updated: datetime


class AuthorizationInfo(msgspec.Struct, kw_only=True):
    """The eMSP's answer to a real-time authorization."""

    allowed: AllowedType
    authorization_reference: str | None = None


class CdrToken(Sent, kw_only=True):
    country_code: str
    party_id: str
    uid: str
    type: TokenType
    contract_id: str


class Price(Sent, kw_only=True):
    excl_vat: float
    incl_vat: float | None = None


class CdrDimension(Sent, kw_only=True):
    type: Literal["ENERGY", "TIME", "PARKING_TIME", "FLAT"]
    volume: float


class ChargingPeriod(Sent, kw_only=True):
    start_date_time: str
    dimensions: list[CdrDimension]


class Session(Sent, kw_only=True):
    country_code: str
    party_id: str
    id: str
    start_date_time: str
    end_date_time: str | None = None
    kwh: float
    cdr_token: CdrToken
    auth_method: Literal["AUTH_REQUEST", "COMMAND", "WHITELIST"]
    authorization_reference: str | None = None
    location_id: str
    evse_uid: str
    connector_id: str
    currency: str
    total_cost: Price | None = None
    status: Literal["ACTIVE", "COMPLETED", "INVALID", "PENDING", "RESERVATION"]
    last_updated: str


class SessionPatch(Sent, kw_only=True):
    """A charging session's growth, pushed while it charges."""

    kwh: float
    total_cost: Price
    last_updated: str


class CdrLocation(Sent, kw_only=True):
    id: str
    name: str | None = None
    address: str
    city: str
    country: str
    coordinates: GeoLocation
    evse_uid: str
    evse_id: str
    connector_id: str
    connector_standard: str
    connector_format: str
    connector_power_type: str


class Cdr(Sent, kw_only=True):
    country_code: str
    party_id: str
    id: str
    start_date_time: str
    end_date_time: str
    session_id: str | None = None
    cdr_token: CdrToken
    auth_method: Literal["AUTH_REQUEST", "COMMAND", "WHITELIST"]
    authorization_reference: str | None = None
    cdr_location: CdrLocation
    currency: str
    tariffs: list[Tariff] | None = None
    charging_periods: list[ChargingPeriod]
    total_cost: Price
    total_energy: float
    total_time: float
    last_updated: str


# --- commands ---------------------------------------------------------------------------------


class ReserveNow(msgspec.Struct, kw_only=True):
    response_url: Url
    token: Token
    expiry_date: datetime
    reservation_id: CiString36
    location_id: CiString36
    evse_uid: CiString36 | None = None
    authorization_reference: CiString36 | None = None


class CancelReservation(msgspec.Struct, kw_only=True):
    response_url: Url
    reservation_id: CiString36


class StartSession(msgspec.Struct, kw_only=True):
    response_url: Url
    token: Token
    location_id: CiString36
    evse_uid: CiString36 | None = None
    connector_id: CiString36 | None = None
    authorization_reference: CiString36 | None = None


class StopSession(msgspec.Struct, kw_only=True):
    response_url: Url
    session_id: CiString36


class UnlockConnector(msgspec.Struct, kw_only=True):
    response_url: Url
    location_id: CiString36
    evse_uid: CiString36
    connector_id: CiString36


COMMANDS: dict[str, type[Any]] = {
    "RESERVE_NOW": ReserveNow,
    "CANCEL_RESERVATION": CancelReservation,
    "START_SESSION": StartSession,
    "STOP_SESSION": StopSession,
    "UNLOCK_CONNECTOR": UnlockConnector,
}


class DisplayText(Sent, kw_only=True):
    language: str
    text: str


def text(message: str) -> list[DisplayText]:
    return [DisplayText(language="en", text=message)]


class CommandResponse(Sent, kw_only=True):
    result: CommandResponseType
    timeout: int
    message: list[DisplayText] | None = None


class CommandResult(Sent, kw_only=True):
    result: CommandResultType
    message: list[DisplayText] | None = None


# --- bookings (2.3.0) -----------------------------------------------------------------------------


class Timeslot(msgspec.Struct, kw_only=True, omit_defaults=True):
    start_from: datetime
    end_before: datetime
    min_power: float | None = None
    max_power: float | None = None
    green_energy_support: bool | None = None


class SentTimeslot(Sent, kw_only=True):
    start_from: str
    end_before: str
    max_power: float | None = None


class BookingToken(msgspec.Struct, kw_only=True, omit_defaults=True):
    country_code: CiString2
    party_id: CiString3
    uid: CiString36
    type: TokenType
    contract_id: CiString36


class Cancellation(msgspec.Struct, kw_only=True):
    cancellation_reason: CanceledReason
    who_canceled: Role


class BookingRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    country_code: CiString2
    party_id: CiString3
    request_id: CiString36
    location_id: CiString36
    evse_uid: CiString36 | None = None
    connector_id: CiString36 | None = None
    tokens: list[BookingToken] = []
    period: Timeslot
    authorization_reference: CiString36
    power_required: int | None = None
    canceled: Cancellation | None = None


class BookingTerms(Sent, kw_only=True):
    RFID_auth_required: bool
    token_groups_supported: bool
    remote_auth_supported: bool
    supported_access_methods: list[str]
    change_until_minutes: int
    cancel_until_minutes: int
    change_not_allowed: bool
    early_start_allowed: bool
    early_start_time: int
    noshow_timeout: int
    noshow_fee: bool
    late_stop_allowed: bool
    overlapping_bookings_allowed: bool


class Calendar(Sent, kw_only=True):
    id: str
    begin_from: str
    end_before: str
    step_size: int
    available_timeslots: list[SentTimeslot]
    last_updated: str


class Bookable(Sent, kw_only=True):
    reservation_required: bool


class BookingLocation(Sent, kw_only=True):
    country_code: str
    party_id: str
    id: str
    location_id: str
    evse_uid: str
    connector_id: str
    bookable: Bookable
    tariff_id: list[str]
    booking_terms: list[BookingTerms]
    calendars: list[Calendar]
    last_updated: str


class AccessMethod(Sent, kw_only=True):
    location_access: str


class BookingRequestStatus(Sent, kw_only=True):
    request_status: RequestStatus
    booking_request: dict[str, Any]
    request_received: str


class Booking(Sent, kw_only=True):
    id: str
    country_code: str
    party_id: str
    request_id: str
    location_id: str
    evse_uid: str | None = None
    connector_id: str | None = None
    booking_tokens: list[dict[str, Any]]
    tariff_id: list[str]
    period: SentTimeslot
    reservation_status: ReservationStatus
    canceled: dict[str, Any] | None = None
    access_methods: list[AccessMethod]
    authorization_reference: str
    booking_terms: BookingTerms
    booking_requests: list[BookingRequestStatus]
    last_updated: str


class BookingPatch(Sent, kw_only=True):
    """What a booking's status change pushes to its eMSP."""

    reservation_status: ReservationStatus
    canceled: dict[str, Any] | None = None
    last_updated: str
