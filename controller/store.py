"""The controller's embedded SQLite state: CA material, the view version
counter with a history of inventory snapshots (so reconnecting agents get
incremental updates, also across restarts), and issued certificates.

Thread-safe (one connection behind a lock). The file lives in the state
directory, created mode 0700; the database holds the CA private key.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Protocol

DB_NAME = "controller.db"
# Older versions are forgotten; an agent resuming from one gets a snapshot.
HISTORY_KEEP = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS inventory_history (
    version INTEGER PRIMARY KEY, view_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY, node TEXT NOT NULL,
    not_before INTEGER NOT NULL, not_after INTEGER NOT NULL, der BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS used_tokens (
    node TEXT NOT NULL, token_sha256 TEXT NOT NULL, used_at INTEGER NOT NULL,
    PRIMARY KEY (node, token_sha256));
CREATE TABLE IF NOT EXISTS revoked (
    serial TEXT PRIMARY KEY, node TEXT NOT NULL, not_after INTEGER NOT NULL);
"""


class StateStore(Protocol):
    """What the controller keeps: implemented by :class:`Store` (SQLite, one
    replica) and :class:`controller.store_etcd.EtcdStore` (etcd, several)."""

    def close(self) -> None: ...
    def get_meta(self, key: str) -> bytes | None: ...
    def set_meta(self, key: str, value: bytes) -> None: ...
    def create_meta_once(self, items: dict[str, bytes]) -> dict[str, bytes]: ...
    def current_version(self) -> int: ...
    def inventory_at(self, version: int) -> str | None: ...
    def record_inventory(self, view_json: str) -> tuple[int, bool]: ...
    def add_certificate(self, serial: int, node: str, not_before: int, not_after: int, der: bytes) -> None: ...
    def certificates_for(self, node: str) -> list[tuple[str, int, int]]: ...
    def certificate_ders(self, node: str) -> list[tuple[int, int, bytes]]: ...
    def consume_token(self, node: str, token_sha256: bytes, now: int) -> bool: ...
    def revoke(self, entries: list[tuple[int, str, int]]) -> None: ...
    def revoked(self, now: int) -> list[tuple[int, str, int]]: ...


class Store:
    """SQLite state in ``state_dir/controller.db``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.path = self.state_dir / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        os.chmod(self.path, 0o600)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get_meta(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def create_meta_once(self, items: dict[str, bytes]) -> dict[str, bytes]:
        """Store every item iff none exists yet (one transaction); returns
        what is stored afterwards (ours or the earlier ones)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = {k: self._db.execute("SELECT value FROM meta WHERE key = ?", (k,)).fetchone() for k in items}
                if all(r is None for r in rows.values()):
                    self._db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(items.items()))
                    self._db.execute("COMMIT")
                    return dict(items)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if any(r is None for r in rows.values()):
            raise ValueError(f"{self.path}: CA material is incomplete ({sorted(k for k, r in rows.items() if r)} "
                             "present); restore the state directory or remove those keys")
        return {k: bytes(r[0]) for k, r in rows.items()}

    def current_version(self) -> int:
        """Latest view version; 0 before any inventory was recorded."""
        with self._lock:
            row = self._db.execute("SELECT MAX(version) FROM inventory_history").fetchone()
        return int(row[0] or 0)

    def inventory_at(self, version: int) -> str | None:
        """The inventory snapshot (``Inventory.view_json()``) of a version, or
        None if unknown or pruned."""
        with self._lock:
            row = self._db.execute("SELECT view_json FROM inventory_history WHERE version = ?",
                                   (version,)).fetchone()
        return None if row is None else row[0]

    def record_inventory(self, view_json: str) -> tuple[int, bool]:
        """Record a snapshot; bumps the version only if it differs from the
        latest. Returns (current version, whether it was bumped)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT version, view_json FROM inventory_history ORDER BY version DESC LIMIT 1").fetchone()
                if row is not None and row[1] == view_json:
                    self._db.execute("COMMIT")
                    return int(row[0]), False
                version = (int(row[0]) if row else 0) + 1
                self._db.execute("INSERT INTO inventory_history (version, view_json) VALUES (?, ?)",
                                 (version, view_json))
                self._db.execute("DELETE FROM inventory_history WHERE version <= ?",
                                 (version - HISTORY_KEEP,))
                self._db.execute("COMMIT")
                return version, True
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def add_certificate(self, serial: int, node: str, not_before: int, not_after: int, der: bytes) -> None:
        """Record an issued certificate (times: Unix seconds)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO certificates (serial, node, not_before, not_after, der) VALUES (?, ?, ?, ?, ?)",
                (format(serial, "x"), node, not_before, not_after, der))

    def certificates_for(self, node: str) -> list[tuple[str, int, int]]:
        """(serial hex, not_before, not_after) of every certificate issued to node."""
        with self._lock:
            rows = self._db.execute(
                "SELECT serial, not_before, not_after FROM certificates WHERE node = ? ORDER BY not_before",
                (node,)).fetchall()
        return [(r[0], int(r[1]), int(r[2])) for r in rows]

    def certificate_ders(self, node: str) -> list[tuple[int, int, bytes]]:
        """(serial, not_after, DER) of every certificate issued to node."""
        with self._lock:
            rows = self._db.execute("SELECT serial, not_after, der FROM certificates WHERE node = ?",
                                    (node,)).fetchall()
        return [(int(r[0], 16), int(r[1]), bytes(r[2])) for r in rows]

    def consume_token(self, node: str, token_sha256: bytes, now: int) -> bool:
        """Mark a node's join token (its SHA-256) used; True if it was not
        used before (atomic: of two concurrent callers exactly one wins)."""
        with self._lock:
            cur = self._db.execute("INSERT OR IGNORE INTO used_tokens (node, token_sha256, used_at) VALUES (?, ?, ?)",
                                   (node, token_sha256.hex(), now))
            return cur.rowcount == 1

    def revoke(self, entries: list[tuple[int, str, int]]) -> None:
        """Record revoked certificates: (serial, node, not_after Unix seconds)."""
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO revoked (serial, node, not_after) VALUES (?, ?, ?)",
                                 [(format(serial, "x"), node, na) for serial, node, na in entries])

    def revoked(self, now: int) -> list[tuple[int, str, int]]:
        """(serial, node, not_after) of revoked certificates not expired at
        ``now`` (Unix seconds), by serial; expired ones are forgotten."""
        with self._lock:
            self._db.execute("DELETE FROM revoked WHERE not_after <= ?", (now,))
            rows = self._db.execute("SELECT serial, node, not_after FROM revoked").fetchall()
        return sorted((int(r[0], 16), r[1], int(r[2])) for r in rows)
