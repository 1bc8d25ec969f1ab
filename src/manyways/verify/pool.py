"""A pool of killable worker processes for checks that may hang.

math-verify (sympy underneath) can spend unbounded time on some inputs, and its own
``signal.alarm`` timeout works only in the main thread. So every check that touches a parsed
expression runs in a worker process; a check that overruns its timeout gets its worker killed
and replaced, and the caller gets a ``timeout`` result. Only plain picklable values
(strings, bools, tuples of them) cross the process boundary.

Each worker is a fresh interpreter started with ``python -m manyways.verify.pool`` (spawn
semantics, but without multiprocessing's re-import of the caller's ``__main__``, which fails for
``python -`` / notebooks and re-runs unguarded scripts); requests and replies are pickled over
its stdin/stdout with :class:`multiprocessing.connection.Connection`. A worker exits when its
parent disappears. The pool is safe to use from many threads: each call borrows one idle worker.
``timeout_s`` is a deadline from the call: waiting for a free worker (queueing behind other
calls, or for the replacement of a killed worker to start) and the check itself both count; a call
that cannot get a ready worker in time returns ``timeout`` without running (counted in
``queue_timeouts``). Workers join the idle queue only once started. Only the pool's first start
(until its first worker has imported the task's modules) is not counted; ``start(wait=True)``
pays it up front.

Pool size: ``MANYWAYS_VERIFY_WORKERS`` (default 1, because the machines this runs on have two
cores and generation needs the other). Pools are shut down at interpreter exit.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0
_SRC_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_READY = "__ready__"


def default_workers() -> int:
    """Pool size from ``MANYWAYS_VERIFY_WORKERS`` (default 1)."""
    try:
        return max(1, int(os.environ.get("MANYWAYS_VERIFY_WORKERS", "1")))
    except ValueError:
        return 1


def _resolve(task: str) -> Callable[..., Any]:
    module_name, _, func_name = task.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def _worker_main(task: str, preload: tuple[str, ...], conn_in: Connection, conn_out: Connection) -> None:
    """Worker loop: import the task function, say ready, then answer requests until EOF."""
    for module_name in preload:
        importlib.import_module(module_name)
    func = _resolve(task)
    try:
        conn_out.send(_READY)
    except OSError:  # the pool was shut down while this worker started
        return
    while True:
        try:
            args = conn_in.recv()
        except (EOFError, OSError):
            return
        try:
            conn_out.send(("ok", func(*args)))
        except Exception as exc:  # any failure of the check is reported, never raised
            conn_out.send(("error", f"{type(exc).__name__}: {exc}"[:500]))


def _watch_parent(parent_pid: int) -> None:
    """Exit the worker when the process that started it is gone (runs in a daemon thread)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _serve_stdio(task: str, preload_csv: str) -> None:
    """Entry point of a worker process: requests on fd 0, replies on fd 1, logs on fd 2."""
    conn_in = Connection(os.dup(0), writable=False)
    conn_out = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # stray prints must not corrupt the reply channel
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    _worker_main(task, tuple(m for m in preload_csv.split(",") if m), conn_in, conn_out)


class _Worker:
    """One worker process (a fresh interpreter, like ``spawn``) and the parent's pipe ends."""

    def __init__(self, task: str, preload: tuple[str, ...]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC_DIR, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "manyways.verify.pool", task, ",".join(preload)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.conn_out = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.conn_in = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.ready = False

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> bool:
        if not self.ready and self.conn_in.poll(max(timeout_s, 0.0)):
            self.ready = self.conn_in.recv() == _READY
        return self.ready

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        finally:
            self.conn_in.close()
            self.conn_out.close()


class WorkerPool:
    """Lazily started pool of killable workers that each run ``task`` ("module:function")."""

    def __init__(self, task: str, workers: int | None = None, preload: tuple[str, ...] = ()) -> None:
        self.task = task
        self.preload = preload
        self.size = workers if workers is not None else default_workers()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self.kills = 0
        self.queue_timeouts = 0
        self._booting: set[_Worker] = set()
        self._warm = threading.Event()  # set once the first worker of a start is ready

    def start(self, wait: bool = False) -> None:
        """Start the workers (idempotent); with ``wait`` block until all are ready."""
        with self._lock:
            if not self._started:
                self._started = True
                self._closed = False
                self._warm.clear()
                for _ in range(self.size):
                    self._boot()
                atexit.register(self.shutdown)
        if wait:
            workers = [self._idle.get() for _ in range(self.size)]
            for worker in workers:
                self._idle.put(worker)

    def _boot(self) -> None:
        """Start a worker (call with the lock held); it joins the idle queue once it is ready, so a
        call never borrows a worker that is still importing."""
        worker = _Worker(self.task, self.preload)
        self._booting.add(worker)
        threading.Thread(target=self._admit, args=(worker,), daemon=True).start()

    def call(self, args: tuple[Any, ...], timeout_s: float) -> tuple[str, Any]:
        """Run the task on ``args``: ("ok", result), ("timeout", None) or ("error", message);
        returns within ``timeout_s`` of the call (see the module docstring)."""
        self.start()
        self._warm.wait(STARTUP_TIMEOUT_S)  # the pool's first start is not the check's time
        deadline = time.monotonic() + timeout_s
        try:
            worker = self._idle.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            return self._queue_timeout(timeout_s)
        try:
            if not worker.wait_ready(0.0):  # admitted workers are ready, or failed (EOF raises)
                self._idle.put(worker)
                return self._queue_timeout(timeout_s)
            if deadline <= time.monotonic():  # ready, but no time left to run the check
                self._release(worker)
                return self._queue_timeout(timeout_s)
            worker.conn_out.send(args)
            if worker.conn_in.poll(max(deadline - time.monotonic(), 0.0)):
                result = worker.conn_in.recv()
                self._release(worker)
                return result
        except (OSError, EOFError, RuntimeError) as exc:
            log.warning("verify worker failed (%s); replacing it", exc)
            self._replace(worker)
            return ("error", f"worker failed: {exc}")
        log.info("check exceeded %.1fs; killing worker %s", timeout_s, worker.proc.pid)
        self._replace(worker)
        return ("timeout", None)

    def _queue_timeout(self, timeout_s: float) -> tuple[str, Any]:
        with self._lock:
            self.queue_timeouts += 1
        log.info("no worker became free within %.1fs; the check did not run", timeout_s)
        return ("timeout", None)

    def _release(self, worker: _Worker) -> None:
        if self._closed:
            worker.kill()
        else:
            self._idle.put(worker)

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` and start a fresh one (calls waiting meanwhile count it in their deadline)."""
        self.kills += 1
        worker.kill()
        with self._lock:
            if not self._closed:
                self._boot()

    def _admit(self, worker: _Worker) -> None:
        try:
            worker.wait_ready()
        except (OSError, EOFError) as exc:  # a call on it reports the failure and replaces it
            if not self._closed:
                log.warning("verify worker failed to start (%s)", exc)
        with self._lock:
            closed = self._closed
            self._booting.discard(worker)
        if closed:
            worker.kill()
        else:
            self._idle.put(worker)
            self._warm.set()

    def call_many(self, arg_list: list[tuple[Any, ...]], timeout_s: float) -> list[tuple[str, Any]]:
        """Fan ``arg_list`` out over all workers; results in input order."""
        if not arg_list:
            return []
        self.start()
        with ThreadPoolExecutor(max_workers=self.size) as executor:
            return list(executor.map(lambda a: self.call(a, timeout_s), arg_list))

    def shutdown(self) -> None:
        """Stop every idle worker (busy ones are stopped when their call returns)."""
        with self._lock:
            self._closed = True
            self._started = False
            booting, self._booting = self._booting, set()
        for worker in booting:
            worker.kill()
        with self._lock:
            while True:
                try:
                    worker = self._idle.get_nowait()
                except queue.Empty:
                    break
                worker.kill()


if __name__ == "__main__":
    _serve_stdio(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
