"""Time slices, so a guest that never exits cannot keep Python from running.

`uc_emu_start` on a `jmp $` guest never returns by itself, and Python runs a signal handler
(the notebook's stop button raises KeyboardInterrupt in the main thread) only between
bytecodes. One daemon thread stops every vCPU that has stayed inside the same
`uc_emu_start` for a whole period; the vCPU's run loop sees that nothing happened and goes
on, after Python has handled any signal. (Unicorn's own `timeout=` starts a timer thread on
every `emu_start`, about 0.1 ms each: too slow for a call made on every exit.)
"""
from __future__ import annotations

import threading
import time
import weakref

PERIOD = 0.05  # seconds; a slice lasts between one and two periods


class Watchdog:
    def __init__(self, period: float = PERIOD):
        self.period = period
        self._vcpus: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, vcpu) -> None:
        """Tick `vcpu` (its `_tick()` method) every period, until `forget(vcpu)`."""
        with self._lock:
            self._vcpus.add(vcpu)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vlab-tcg-watchdog",
                                                daemon=True)
                self._thread.start()

    def forget(self, vcpu) -> None:
        """After this returns, `vcpu` is not ticked again (its engine may be closed)."""
        with self._lock:
            self._vcpus.discard(vcpu)

    def _loop(self) -> None:
        while True:
            time.sleep(self.period)
            with self._lock:
                if not self._vcpus:
                    self._thread = None
                    return
                for vcpu in list(self._vcpus):
                    vcpu._tick()


WATCHDOG = Watchdog()
