"""The controller's current inventory and view version (:class:`ControllerState`), shared by
the servicer (controller.servicer) and the server (controller.server); wakes Watch streams
on every change."""
from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time

from controller.policy import Inventory
from controller.store import StateStore


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class ControllerState:
    """The current inventory and view version; wakes watchers on change."""

    def __init__(self, store: StateStore, inventory: Inventory, *, record: bool = True,
                 revoked: tuple[tuple[int, int], ...] = ()) -> None:
        self._store = store
        self._cond = threading.Condition()
        self._watchers: set[threading.Event] = set()
        # revocations ride in the recorded inventory: versioned, in the history, seen by HA followers
        self._revoked = tuple(sorted(revoked))
        inventory = dataclasses.replace(inventory, revoked=self._revoked)
        self._inventory = inventory
        self.changed_at = time.monotonic()  # when this replica learnt the current version
        self.read_only = not record
        if record:
            self._version, _ = store.record_inventory(inventory.view_json())
        else:  # HA follower: serve what the leader recorded
            self._version = store.current_version()
            stored = store.inventory_at(self._version)
            if stored is not None:
                self._inventory = Inventory.from_view_json(stored)
                self._revoked = self._inventory.revoked

    def snapshot(self) -> tuple[Inventory, int]:
        with self._cond:
            return self._inventory, self._version

    def update(self, inventory: Inventory | None = None,
               revoked: tuple[tuple[int, int], ...] | None = None) -> tuple[int, bool]:
        """Install a new inventory and/or a new revoked set ((serial,
        not_after) pairs); None keeps the current one. Returns (version,
        bumped). Token-only changes take effect without a version bump."""
        with self._cond:
            if self.read_only:  # HA follower: the leader records versions; we adopt them from the store
                return self._version, False
            if revoked is not None:
                self._revoked = tuple(sorted(revoked))
            inventory = dataclasses.replace(inventory or self._inventory, revoked=self._revoked)
            version, bumped = self._store.record_inventory(inventory.view_json())
            if version != self._version:
                self.changed_at = time.monotonic()
            self._version = version
            self._inventory = inventory
            self._notify()
            return self._version, bumped

    def adopt(self, version: int, inventory: Inventory) -> bool:
        """Install a version another replica recorded (HA follower); ignores
        versions not newer than the current one. True if installed."""
        with self._cond:
            if version <= self._version:
                return False
            self._version, self._inventory = version, inventory
            self._revoked = inventory.revoked  # a follower elected later keeps the leader's revocations
            self.changed_at = time.monotonic()
            self._notify()
            return True

    def _notify(self) -> None:
        # caller holds self._cond
        self._cond.notify_all()
        for event in self._watchers:
            event.set()

    def wake(self) -> None:
        """Wake every waiter (shutdown)."""
        with self._cond:
            self._notify()

    def watcher(self) -> threading.Event:
        """A wake-up event for one stream: set on every version change and by
        :meth:`wake`; the stream's own end sets it alone, so a thousand
        streams closing at once do not wake each other."""
        event = threading.Event()
        with self._cond:
            self._watchers.add(event)
        return event

    def unwatch(self, event: threading.Event) -> None:
        with self._cond:
            self._watchers.discard(event)

    def wait_newer(self, version: int, timeout: float,
                   wakeup: threading.Event | None = None) -> tuple[Inventory, int]:
        """The current (inventory, version) once it is not ``version``, or
        after ``timeout`` seconds, or when ``wakeup`` (from :meth:`watcher`)
        is set."""
        if wakeup is None:
            with self._cond:
                self._cond.wait_for(lambda: self._version != version, timeout=timeout)
                return self._inventory, self._version
        with self._cond:
            if self._version != version:
                return self._inventory, self._version
        wakeup.wait(timeout)
        wakeup.clear()  # before reading the version: a change after this sets it again
        with self._cond:
            return self._inventory, self._version

    def change_age(self) -> float:
        """Seconds since the current version reached this replica."""
        return time.monotonic() - self.changed_at
