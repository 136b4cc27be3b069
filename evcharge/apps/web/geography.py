"""What the dashboard's map is drawn from: the world's stations and cities, the coast, the states.

All of it goes into the page once (it does not change while the dashboard runs) and
the browser draws it as SVG: no tile server, nothing fetched, so the map works offline.
The coast is a hand-made polyline through real coastal places of Brazil's Northeast,
north-west to south (latitude, longitude, about a kilometre off at worst): enough to
see where the stations are, not a survey.
"""

from __future__ import annotations

from typing import Any

from evcharge.domain import geo
from evcharge.domain.world import World

COAST: list[tuple[str, float, float]] = [
    ("São Luís", -2.53, -44.30),
    ("Barreirinhas", -2.72, -42.83),
    ("Parnaíba", -2.87, -41.77),
    ("Camocim", -2.88, -40.84),
    ("Jericoacoara", -2.79, -40.51),
    ("Trairi", -3.22, -39.27),
    ("Fortaleza", -3.71, -38.52),
    ("Aquiraz", -3.90, -38.33),
    ("Aracati", -4.52, -37.72),
    ("Icapuí", -4.71, -37.35),
    ("Areia Branca", -4.93, -37.13),
    ("Macau", -5.09, -36.63),
    ("Galinhos", -5.09, -36.27),
    ("Caiçara do Norte", -5.06, -35.88),
    ("Touros", -5.19, -35.46),
    ("Natal", -5.77, -35.19),
    ("Pipa", -6.23, -35.04),
    ("Baía Formosa", -6.37, -34.99),
    ("Cabedelo", -6.98, -34.83),
    ("Cabo Branco", -7.15, -34.79),
    ("Recife", -8.06, -34.87),
    ("Cabo de Santo Agostinho", -8.29, -34.95),
    ("Tamandaré", -8.76, -35.10),
    ("Maragogi", -9.01, -35.22),
    ("Maceió", -9.67, -35.71),
    ("Coruripe", -10.13, -36.17),
    ("Foz do São Francisco", -10.50, -36.40),
    ("Aracaju", -10.97, -37.04),
    ("Mangue Seco", -11.47, -37.36),
    ("Praia do Forte", -12.58, -38.00),
    ("Salvador", -13.01, -38.53),
    ("Valença", -13.37, -39.07),
    ("Itacaré", -14.28, -38.99),
    ("Ilhéus", -14.79, -39.03),
    ("Canavieiras", -15.68, -38.95),
    ("Porto Seguro", -16.45, -39.06),
    ("Prado", -17.34, -39.22),
    ("Caravelas", -17.73, -39.26),
    ("Mucuri", -18.09, -39.55),
]

# Where each state's name is written (inland, roughly at its heart within the map).
STATES: list[tuple[str, float, float]] = [
    ("CE", -5.0, -39.6),
    ("RN", -5.85, -36.7),
    ("PB", -7.2, -36.6),
    ("PE", -8.45, -37.6),
    ("AL", -9.55, -36.55),
    ("SE", -10.6, -37.45),
    ("BA", -12.2, -41.0),
    ("PI", -7.0, -41.8),
]


def map_data(world: World) -> dict[str, Any]:
    """Every station of the world (ours and the other operators'), the cities, the coast and the states."""
    return {
        "stations": [
            {"id": s.id, "name": s.name, "city": s.city, "operator_id": s.operator, "lat": s.lat, "lon": s.lon}
            for s in world.stations
        ],
        "cities": [{"name": name, "lat": lat, "lon": lon} for name, (lat, lon) in geo.CITIES.items()],
        "coast": [[lat, lon] for _, lat, lon in COAST],
        "states": [{"name": name, "lat": lat, "lon": lon} for name, lat, lon in STATES],
    }
