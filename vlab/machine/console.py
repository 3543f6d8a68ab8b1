"""The guest's console output: one place the serial and debug console devices write to."""
from __future__ import annotations

import threading


class Console:
    """What the guest printed (serial and debug console), kept whole, with listeners."""

    def __init__(self):
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self.listeners: list = []
        self._dropped = 0   # chunks clear() dropped, still counted by `writes`

    def write(self, data: bytes) -> None:
        with self._lock:
            self._chunks.append(data if data.__class__ is bytes else bytes(data))
        for listener in self.listeners:
            listener(data)

    @property
    def data(self) -> bytes:
        with self._lock:
            return b"".join(self._chunks)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    @property
    def writes(self) -> int:
        """How many writes it has taken, clear() or not: what views poll for new output (the
        compiled run loop appends to the chunks itself, as write does)."""
        return self._dropped + len(self._chunks)

    def clear(self) -> None:
        with self._lock:
            self._dropped += len(self._chunks)
            self._chunks.clear()
