"""Credentials: constant-time checks and the peers' HMAC challenge-response.

Operators prove to each other that they know the connecting operator's secret
without sending it: each side sends a fresh random nonce and answers the
other's with HMAC-SHA256(secret, side | both nonces | who). A recorded
handshake is useless later because the other side's nonce will differ.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


def same_secret(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())


def new_nonce() -> str:
    return secrets.token_hex(16)


def peer_proof(secret: str, side: str, client_nonce: str, server_nonce: str, operator_id: str) -> str:
    """``side`` is "server" or "client": the two proofs of one handshake differ."""
    message = f"evcharge-peer|{side}|{client_nonce}|{server_nonce}|{operator_id}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
