"""One run per output_dir: an exclusive lock on the run folder.

`output_dir/.lock` holds the owner's pid, host, start time and command line, and is locked with
flock (Linux emulates it with record locks on NFS, so other hosts see it there too). flock, not
lockf: a record lock is dropped when the process closes *any* descriptor of the file, e.g. a
stray open() of it. The kernel drops the lock when its process dies, however it dies (SIGKILL
included), so a lock file left behind is stale by construction: the next run takes it over and
says whose it was. A second run while the first
lives is refused in one line that names the first.

    lock = lock_run_dir(cfg.output_dir)       # collective: every rank calls it; rank 0 locks
    ...                                       # train; the lock is released at exit
"""
import atexit
import fcntl
import json
import logging
import os
import socket
import sys
import time

log = logging.getLogger("img2vec")

LOCK_NAME = ".lock"


class RunLockedError(ValueError):
    """Another live run holds the output folder; the message is one line naming it."""


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {started}"


def _read_owner(path: str) -> dict:
    try:
        with open(path) as f:
            owner = json.loads(f.read() or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive_here(owner: dict) -> bool:
    """False only if the owner ran on this host and its pid is gone; True when unsure."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class RunLock:
    """An exclusive lock on `output_dir` held by this process until release() or exit."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd = None

    def acquire(self, orphan_wait_s: float = 15.0) -> "RunLock":
        """Take the lock or raise RunLockedError (one line). Creates output_dir if needed.

        A forked child (a DataLoader worker) shares the lock's open file, so for a few seconds
        after its owner is SIGKILLed the lock can outlive the owner: if the owner's pid is gone
        from this host, wait up to orphan_wait_s for its children to go too.
        """
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        deadline = time.monotonic() + orphan_wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                owner = _read_owner(self.path)
                if not _alive_here(owner) and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                raise RunLockedError(f"{os.path.dirname(self.path)} is in use by another run ({_describe(owner)}"
                                     f"{': ' + owner['command'] if owner.get('command') else ''}); wait for it "
                                     f"to finish or stop it, or pick another output_dir") from None
            # The file may have been unlinked by its previous owner between our open and lock:
            # then we locked a file nobody else can see. Start again on the one at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            stale = json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
        except ValueError:
            stale = {}
        if isinstance(stale, dict) and stale.get("pid"):
            log.info("taking over the lock of %s left by a run that is gone (%s)", os.path.dirname(self.path),
                     _describe(stale))
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                 "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        atexit.register(self.release)
        return self

    def release(self) -> None:
        """Remove the lock file and unlock (unlink first: a waiter then sees a fresh file)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing the last descriptor drops the lock
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_run_dir(output_dir: str) -> RunLock | None:
    """Collective: rank 0 takes the lock of output_dir; every rank raises RunLockedError if it
    could not (so all stop at once). Returns the lock on rank 0, None on the others."""
    import torch
    import torch.distributed as dist

    lock, message = None, ""
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            lock = RunLock(output_dir).acquire()
        except RunLockedError as e:
            message = str(e)
        except OSError as e:  # a file, a read-only folder, no permission
            message = f"cannot write to output_dir {output_dir} ({e.strerror}); pick another output_dir"
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([float(bool(message))],
                            device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not message:
            message = f"{output_dir} is in use by another run (see rank 0's log)"
    if message:
        raise RunLockedError(message)
    return lock
