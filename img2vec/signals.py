"""Preemption and Ctrl-C: ask the training loop to checkpoint and exit cleanly, under any launcher.

How the launchers deliver a stop (read from their sources, deepspeed 0.19 and torch 2.x):

- `deepspeed` (single node): the runner (`bin/deepspeed`) starts `deepspeed.launcher.launch`,
  which starts the workers; all three share the terminal's process group. The runner installs
  no handler: SIGTERM kills it silently and the workers never hear of it; on Ctrl-C it dies of
  KeyboardInterrupt. `launch` turns SIGINT/SIGTERM into SIGTERM to each worker's process tree,
  SIGKILLs whatever is left 30 s later, and exits 1. So one Ctrl-C reaches a worker twice:
  SIGINT from the terminal, then SIGTERM from `launch`.
- `torchrun`: workers run in their own session (Ctrl-C does not reach them); the agent forwards
  the signal it got (SIGINT or SIGTERM) once, SIGKILLs after 30 s, and exits 1 with its own
  SignalException traceback, whatever the worker does.
- plain python: the signal reaches the process directly.

Hence the rules here:
- the first SIGTERM or SIGINT asks for a checkpoint and exit 0;
- a SIGTERM after that is the same request (launchers and schedulers forward SIGTERM, sometimes
  twice; a scheduler that wants the process gone sends SIGKILL, which nothing can catch);
- a SIGINT more than DUPLICATE_WINDOW_S after the first signal is a person pressing Ctrl-C
  again: exit at once, without a checkpoint (inside the window it is a duplicate delivery);
- a launcher that died (the `deepspeed` runner killed by SIGTERM leaves `launch` and the workers
  running, re-parented) is the same request: a watcher thread polls the chain of launcher
  processes above this one once a second. Polling rather than PR_SET_PDEATHSIG: that fires
  only for the direct parent, and also when the parent's spawning *thread* exits.
"""
import logging
import os
import signal
import threading
import time

log = logging.getLogger("img2vec")

DUPLICATE_WINDOW_S = 1.0  # a second SIGINT closer than this to the first signal is the same Ctrl-C
POLL_S = 1.0  # how often the watcher looks at the launcher processes
# Words in a launcher's command line (its first four arguments: `python -u -m deepspeed.launcher.launch`).
_LAUNCHER_NAMES = ("deepspeed", "torchrun")
_LAUNCHER_MODULES = ("deepspeed.launcher", "torch.distributed.run", "torch.distributed.launch",
                     "torch.distributed.elastic")


def _parent_pid(pid: int) -> int | None:
    """The parent of `pid` from /proc (None if it is gone or /proc is not there)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])  # fields after "(comm)": state, ppid, ...


def _is_launcher(pid: int) -> str | None:
    """The launcher's name if process `pid` is a deepspeed or torchrun launcher, else None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")[:4]
    except OSError:
        return None
    for arg in argv:
        if os.path.basename(arg) in _LAUNCHER_NAMES or any(arg.startswith(m) for m in _LAUNCHER_MODULES):
            return os.path.basename(arg)
    return None


def launcher_chain(pid: int | None = None) -> list[tuple[int, int, str]]:
    """(child, launcher, launcher's name) for each launcher process above `pid` (this process),
    innermost first. Empty for a plain python run."""
    links, child = [], os.getpid() if pid is None else pid
    while True:
        parent = _parent_pid(child)
        name = _is_launcher(parent) if parent and parent > 1 else None
        if name is None:
            return links
        links.append((child, parent, name))
        child = parent


class GracefulStop:
    """First SIGTERM/SIGINT, or the death of a launcher above this process: ask the loop to
    checkpoint and exit 0. A later SIGTERM: the same request. A later SIGINT: exit at once."""

    def __init__(self, watch_launcher: bool = True, poll_s: float = POLL_S):
        self.signal_name = None
        self._first_at = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        self._links = launcher_chain() if watch_launcher else []
        if self._links:
            threading.Thread(target=self._watch, args=(poll_s,), name="launcher-watch", daemon=True).start()

    def _request(self, name: str, why: str) -> None:
        self.signal_name, self._first_at = name, time.monotonic()
        log.warning("%s: finishing this step, then checkpointing (press Ctrl-C again to exit now)", why)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self._request(name, f"{name} received")
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > DUPLICATE_WINDOW_S:
            os.write(2, f"{name} again: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        else:
            log.info("%s received: already stopping after this step", name)

    def _watch(self, poll_s: float) -> None:
        while self.signal_name is None:
            for child, launcher, name in self._links:
                ppid = _parent_pid(child)
                if ppid is not None and ppid != launcher:  # re-parented: the launcher is gone
                    if self.signal_name is None:
                        self._request(f"the exit of the {name} launcher",
                                      f"the {name} launcher (pid {launcher}) exited")
                    return
            time.sleep(poll_s)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
