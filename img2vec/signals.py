"""Preemption and Ctrl-C: ask the training loop to checkpoint and exit cleanly."""
import logging
import os
import signal

log = logging.getLogger("img2vec")


class GracefulStop:
    """First SIGTERM/SIGINT: ask the loop to checkpoint and exit 0. Second: exit at once."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then checkpointing (send it again to exit now)",
                    self.signal_name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
