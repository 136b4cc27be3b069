"""Distances on the Earth's surface."""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections.abc import Mapping

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

# City centres (latitude, longitude) of Brazil's Northeast, for "near CITY" and trips in a world that
# names no cities of its own (the shipped `northeast`).
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


class Gazetteer:
    """Cities by name, found ignoring case and accents ("joao pessoa" finds João Pessoa).

    A world may name cities alike in two states as "Santa Rita (PB)" and "Santa Rita (MA)":
    "Santa Rita" alone then asks which one is meant.
    """

    SUGGESTIONS = 5  # close names offered for an unknown one

    def __init__(self, cities: Mapping[str, tuple[float, float]]) -> None:
        self.cities = dict(cities)
        self._by_name = {_fold(city): city for city in self.cities}
        self._by_base: dict[str, list[str]] = {}
        for city in self.cities:
            base = _STATE_SUFFIX.sub("", city)
            if base != city:
                self._by_base.setdefault(_fold(base), []).append(city)

    def find(self, name: str) -> tuple[str, tuple[float, float]]:
        """The city and its position; ``KeyError`` naming the closest names if there is none such."""
        if len(name) > MAX_CITY_NAME:
            # Folding is costly and can grow a string many times over ("ﷺ" is 18 letters in NFKD):
            # a frame-sized name would hold the event loop for seconds. No city is named like that.
            raise KeyError(f"unknown city {name[:MAX_CITY_NAME]!r}… ({len(name)} characters)")
        wanted = _fold(name)
        city = self._by_name.get(wanted)
        if city is not None:
            return city, self.cities[city]
        alike = self._by_base.get(wanted, [])
        if len(alike) == 1:
            return alike[0], self.cities[alike[0]]
        if alike:
            raise KeyError(f"there is more than one {name!r}: say which, {' or '.join(alike)}")
        if len(self.cities) <= 20:
            raise KeyError(f"unknown city {name!r}; known: {', '.join(self.cities)}")
        close = difflib.get_close_matches(wanted, self._by_name, n=self.SUGGESTIONS, cutoff=0.7)
        hint = f"; did you mean {', '.join(self._by_name[c] for c in close)}?" if close else ""
        raise KeyError(f"unknown city {name!r}{hint}")


def _fold(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))


_STATE_SUFFIX = re.compile(r" \([A-Z]{2}\)$")

NORTHEAST = Gazetteer(CITIES)


def find_city(name: str) -> tuple[str, tuple[float, float]]:
    """A city of ``CITIES`` by name (see ``Gazetteer.find``)."""
    return NORTHEAST.find(name)
