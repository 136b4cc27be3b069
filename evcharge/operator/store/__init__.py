"""An operator's books on disk; SQLite is the embedded default."""

from evcharge.operator.store.sqlite import (
    MIGRATIONS,
    SCHEMA_VERSION,
    DamagedStoreError,
    Op,
    Store,
    StoredState,
    StoreError,
    migrate,
    put_meta,
    put_reservation,
    put_session,
    put_trip,
    read_state,
)

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "DamagedStoreError",
    "Op",
    "Store",
    "StoreError",
    "StoredState",
    "migrate",
    "put_meta",
    "put_reservation",
    "put_session",
    "put_trip",
    "read_state",
]
