"""An operator's books on disk; SQLite is the embedded default."""

from evcharge.operator.store.sqlite import (
    MIGRATIONS,
    SCHEMA_VERSION,
    DamagedStoreError,
    Op,
    Store,
    StoredState,
    StoreError,
    forget_outcomes,
    migrate,
    put_meta,
    put_outcome,
    put_record,
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
    "forget_outcomes",
    "migrate",
    "put_meta",
    "put_outcome",
    "put_record",
    "put_reservation",
    "put_session",
    "put_trip",
    "read_state",
]
