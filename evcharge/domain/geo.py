"""Distances on the Earth's surface."""

from __future__ import annotations

import math
import unicodedata

EARTH_RADIUS_KM = 6371.0088

# Roads are not great circles. Documented assumption: between the Northeast's
# cities the road is about 25 % longer than the great circle (BR-101 Natal ->
# João Pessoa is ~185 km over 153 km, Recife -> Maceió ~255 km over 203 km).
ROAD_FACTOR = 1.25


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance in kilometres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def road_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Estimated road distance in kilometres: the great circle times ``ROAD_FACTOR``."""
    return great_circle_km(lat1, lon1, lat2, lon2) * ROAD_FACTOR


MAX_CITY_NAME = 100  # characters; longer names are not looked up at all

# City centres (latitude, longitude) of Brazil's Northeast, for "near CITY".
CITIES: dict[str, tuple[float, float]] = {
    "Natal": (-5.7945, -35.2110),
    "Mossoró": (-5.1878, -37.3441),
    "Fortaleza": (-3.7319, -38.5267),
    "João Pessoa": (-7.1195, -34.8450),
    "Campina Grande": (-7.2307, -35.8811),
    "Recife": (-8.0476, -34.8770),
    "Caruaru": (-8.2835, -35.9761),
    "Garanhuns": (-8.8828, -36.4966),
    "Petrolina": (-9.3891, -40.5030),
    "Maceió": (-9.6658, -35.7350),
    "Arapiraca": (-9.7525, -36.6611),
    "Aracaju": (-10.9472, -37.0731),
    "Estância": (-11.2683, -37.4386),
    "Alagoinhas": (-12.1356, -38.4192),
    "Feira de Santana": (-12.2664, -38.9663),
    "Salvador": (-12.9714, -38.5014),
    "Vitória da Conquista": (-14.8615, -40.8442),
}


def find_city(name: str) -> tuple[str, tuple[float, float]]:
    """A city by name, ignoring case and accents ("joao pessoa" finds João Pessoa)."""
    if len(name) > MAX_CITY_NAME:
        # Folding is costly and can grow a string many times over ("ﷺ" is 18 letters in NFKD):
        # a frame-sized name would hold the event loop for seconds. No city is named like that.
        raise KeyError(f"unknown city {name[:MAX_CITY_NAME]!r}… ({len(name)} characters)")
    wanted = _fold(name)
    for city, position in CITIES.items():
        if _fold(city) == wanted:
            return city, position
    raise KeyError(f"unknown city {name!r}; known: {', '.join(CITIES)}")


def _fold(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))
