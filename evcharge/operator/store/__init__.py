"""An operator's books in a store: SQLite (embedded, the default) or PostgreSQL (``--store postgresql://…``)."""

from pathlib import Path

from evcharge.operator.store.base import (
    OP_KINDS,
    POSTGRESQL_SCHEMES,
    DamagedStoreError,
    Op,
    StoredState,
    StoreError,
    StoreInDoubt,
    StoreLost,
    ThreadedStore,
    forget_outcomes,
    put_meta,
    put_outcome,
    put_record,
    put_reservation,
    put_session,
    put_trip,
    put_trip_unacked,
)
from evcharge.operator.store.sqlite import MIGRATIONS, SCHEMA_VERSION, Store, migrate, read_state, store_file

STORE_ENV = "EVCHARGE_STORE"  # the store's URL when neither --store nor the world file names one


def is_postgresql(spec: str | None) -> bool:
    return spec is not None and spec.startswith(POSTGRESQL_SCHEMES)


def store_for(spec: str | None, data_dir: Path, operator_id: str, *, max_bytes: int | None = None) -> ThreadedStore:
    """The store ``spec`` names: a ``postgresql://`` URL, or nothing (or ``sqlite``) for SQLite in ``data_dir``."""
    if not spec or spec == "sqlite":
        return Store(store_file(data_dir, operator_id), max_bytes=max_bytes)
    if not is_postgresql(spec):
        raise StoreError(f"store {spec!r}: give a postgresql://... URL, or none for SQLite in the data directory")
    if max_bytes is not None:
        raise StoreError("--store-limit-mb is SQLite's: a PostgreSQL database's size is its server's business")
    try:
        from evcharge.operator.store.postgresql import PostgresStore
    except ImportError:
        raise StoreError(
            "a PostgreSQL store needs psycopg: pip install 'evcharge[postgresql]' (or psycopg[binary])"
        ) from None
    return PostgresStore(spec, operator_id)


__all__ = [
    "MIGRATIONS",
    "OP_KINDS",
    "POSTGRESQL_SCHEMES",
    "SCHEMA_VERSION",
    "STORE_ENV",
    "DamagedStoreError",
    "Op",
    "Store",
    "StoreError",
    "StoreInDoubt",
    "StoreLost",
    "StoredState",
    "ThreadedStore",
    "forget_outcomes",
    "is_postgresql",
    "migrate",
    "put_meta",
    "put_outcome",
    "put_record",
    "put_reservation",
    "put_session",
    "put_trip",
    "put_trip_unacked",
    "read_state",
    "store_file",
    "store_for",
]
