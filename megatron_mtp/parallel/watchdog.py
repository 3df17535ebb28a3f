"""Heartbeats: a rank that stops answering ends the job within ``parallel.heartbeat_timeout_s``, by name.

A killed rank is noticed at once (its peers' sockets close), but a rank that is stopped (SIGSTOP, a debugger,
a frozen node, a network partition) leaves its peers waiting in a collective until the process-group timeout.
So every rank runs two daemon threads next to training:

* the **beater** increments this rank's counter in the job's rendezvous store (a TCPStore at MASTER_ADDR:
  MASTER_PORT, reached through a client connection of its own) every ``interval`` seconds, and reads the
  counters of the ranks it watches: rank 0 watches every rank, every other rank watches rank 0. That keeps
  the store's load linear in the world size.
* the **monitor** never touches the network: it ends the job when a watched counter has not moved for
  ``timeout_s`` (timed on this rank's own monotonic clock, so clocks need not agree across nodes), or when the
  beater's own store round trip has hung that long (the store's host, rank 0 unless torchrun's agent hosts
  it, stopped answering: a TCPStore client's ``add`` does not time out by itself).

"Ends the job": one line on stderr naming the rank and how long it has been silent, then ``os._exit(3)``
(``EXIT_STATUS``).
The launcher (torchrun, srun, mpirun) then takes down the other processes; a stopped process cannot run its
own exit code, so killing it is the launcher's job.

A rank that leaves normally marks its counter done (:meth:`Watchdog.stop`, called by ``destroy_distributed``),
so its peers stop watching it, and rank 0, whose process hosts the store, waits a moment for the others'
marks before it goes, so their last heartbeats do not hit a closed store.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

from megatron_mtp.errors import EXIT_CODES

# A counter at or above this marks a rank that left normally (ordinary heartbeats never get near it).
DONE = 1 << 40
EXIT_STATUS = EXIT_CODES["training"]  # 3: the run stopped on a fault, not on a mistake in its inputs


def _run_bounded(fn: Callable[[], None], seconds: float) -> bool:
    """Run ``fn`` in a daemon thread for at most ``seconds``: store calls can block forever on a frozen host,
    and a rank on its way out must not hang there. Returns whether it finished."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


class Watchdog:
    def __init__(self, rank: int, world_size: int, host: str, port: int, timeout_s: float,
                 store_on_rank0: bool = True, exit_fn: Callable[[int], None] = os._exit):
        self.rank, self.world_size = rank, world_size
        self.host, self.port = host, port
        self.timeout_s = float(timeout_s)
        # Several beats per timeout, so a slow round trip or a descheduled thread is not taken for silence.
        self.interval = max(0.2, min(5.0, self.timeout_s / 5))
        self.store_on_rank0 = store_on_rank0
        self.exit_fn = exit_fn
        # torchrun's agent keeps its store across worker restarts: a restarted job must not read the previous
        # attempt's counters (a "done" mark among them).
        self.namespace = "mtp_watchdog/{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", "run"),
                                                     os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.watched = list(range(1, world_size)) if rank == 0 else [0]
        now = time.monotonic()
        self._seen = {r: (-1, now) for r in self.watched}  # rank -> (last counter value, when it last moved)
        self._round_trip_since: Optional[float] = None  # when the beater's store call in flight began
        self._stop = threading.Event()
        self._lost = False  # the store went away (its host exited): the job is ending anyway
        self._threads: list = []
        self.store = None

    def _key(self, rank: int) -> str:
        return f"{self.namespace}/{rank}"

    def start(self) -> "Watchdog":
        import torch.distributed as dist

        self.store = dist.TCPStore(self.host, self.port, None, False, timedelta(seconds=max(self.timeout_s, 30.0)),
                                   wait_for_workers=False)
        for target, name in ((self._beat_loop, "mtp-heartbeat"), (self._monitor_loop, "mtp-watchdog")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    # ---- the two threads

    def _beat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._round_trip_since = time.monotonic()
                self.store.add(self._key(self.rank), 1)
                for r in list(self.watched):
                    value = self.store.add(self._key(r), 0)  # add 0: read without blocking on a missing key
                    if value >= DONE:
                        self.watched.remove(r)  # it left normally
                    elif value != self._seen[r][0]:
                        self._seen[r] = (value, time.monotonic())
                self._round_trip_since = None
                if self.rank != 0 and not self.watched:
                    # Rank 0 is leaving, and its process hosts the store: stop touching it before it closes.
                    self._lost = self.store_on_rank0
                    return
            except Exception:  # connection closed: the store's host has exited, so the job is ending
                self._lost = True
                self._round_trip_since = None
                return
            self._stop.wait(self.interval)

    def _monitor_loop(self) -> None:
        while not self._stop.wait(min(1.0, self.interval)):
            now = time.monotonic()
            since = self._round_trip_since
            if since is not None and now - since > self.timeout_s:
                who = "rank 0" if self.store_on_rank0 else f"the rendezvous store at {self.host}:{self.port}"
                self._fail(who, now - since)
                return
            if self._lost:
                continue
            for r in list(self.watched):
                _, moved = self._seen.get(r, (0, now))
                if now - moved > self.timeout_s:
                    self._fail(f"rank {r}", now - moved)
                    return

    def _fail(self, who: str, silent_s: float) -> None:
        if self._stop.is_set():
            return
        sys.stdout.flush()
        print(f"watchdog on rank {self.rank}: {who} stopped answering for {silent_s:.0f} s "
              f"(parallel.heartbeat_timeout_s is {self.timeout_s:g}); ending the job.", file=sys.stderr, flush=True)
        self.exit_fn(EXIT_STATUS)

    # ---- leaving

    def stop(self) -> None:
        """Stop both threads, mark this rank done; rank 0 waits (boundedly) for the others' marks."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.interval + 1.0)
        if self.store is None or self._lost:
            return

        def mark_and_wait() -> None:
            try:
                self.store.add(self._key(self.rank), DONE)
                if self.rank != 0:
                    return
                deadline = time.monotonic() + 2 * self.interval + 1.0
                pending = list(range(1, self.world_size))
                while pending and time.monotonic() < deadline:
                    pending = [r for r in pending if self.store.add(self._key(r), 0) < DONE]
                    if pending:
                        time.sleep(0.05)
            except Exception:  # the store is gone: nobody is left to tell
                pass

        _run_bounded(mark_and_wait, 2 * self.interval + 2.0)
