"""Models tell their views when they change, so widgets stay thin and testable."""
from __future__ import annotations

from typing import Callable


class Observable:
    def __init__(self):
        self._subscribers: list[Callable[..., None]] = []

    def subscribe(self, callback: Callable[..., None]) -> Callable[[], None]:
        """Call `callback(model, **change)` after every change; returns the unsubscriber."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def notify(self, **change) -> None:
        for callback in tuple(self._subscribers):
            callback(self, **change)
