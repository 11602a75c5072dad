"""Wall time and resident memory of a step, measured while it runs."""

from __future__ import annotations

import resource
import sys
import threading
import time

import psutil


def process_peak_rss() -> int:
    """Peak resident set size of this process since it started, in bytes.

    On Linux this is VmHWM, the high-water mark of this process's own address space: getrusage's
    ru_maxrss is inherited across fork and exec, so a child of a large parent would report the
    parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Measured:
    """``with Measured() as m: ...`` then ``m.seconds`` and ``m.peak_rss`` (sampled every ``interval`` s).

    The process-lifetime peak cannot isolate one step, so a background thread samples the RSS;
    a spike shorter than the interval can be missed, which the reports state.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.seconds = 0.0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "Measured":
        self.peak_rss = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the measurement early (what follows inside the block is not counted)."""
        if self._stop.is_set():
            return
        self.seconds = time.perf_counter() - self._started
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.stop()
