"""Peak memory of a block of work, for training (recover) and inference cost (speed)."""
from __future__ import annotations

import os
import threading

import torch


class PeakMemory:
    """Peak memory while a block runs: GPU memory allocated on CUDA, else the process's resident
    set (sampled every 50 ms from /proc, so it covers the model, activations and, in training,
    the optimizer state)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            try:
                with open("/proc/self/statm") as statm:
                    self.peak_bytes = max(self.peak_bytes, int(statm.read().split()[1]) * page)
            except OSError:  # not Linux: no sampling, the metric stays 0
                return
            if self._stop.wait(0.05):
                return
