"""Sampling side by side in worker processes on a CPU: ``with Workers(2) as w: w.imap(job, args)``.

Decoding a 135M model at batch 64-128 keeps a CPU's matmul units busy only part of the time (one token per row
per step, the sampler's work on the vocabulary, Python between steps), so on 2 cores two processes on one
thread each sample more per second than one process on both. Measured on a 2-core AVX2-only VM in fp32
(SmolLM2-135M-Instruct, 2026-12-06; ``python benchmarks/sampling_workers.py --repeats 2``, 2 pairs each, the
1-process time over the 2-worker time, model loads included): the demo's sample stage on 128 prompts x 4
temperatures 1.087 [1.029, 1.144] (112 s vs 104 s; min and max over the pairs), a scaled-down demo eval
(64 prompts x 2 samples, best-of-16 on 16, the KL in the workers too) 1.190 [1.183, 1.198] (168 s vs 141 s);
a tiny eval (16 prompts) took longer with the workers, 56 s vs 36 s (spawning them, loading the models). Not
measured with bf16 decoding (an avx512_bf16 CPU) or on more cores. Training's large matmuls would not gain this
way, so only the stages that sample from a fixed model use it (``sample``, ``eval``: their ``workers``).

A job is a top-level function and its arguments (pickled to a worker); every job must draw its own random
numbers from its own seed (as each sampling batch does), so which worker runs it changes nothing: the
results come back in job order, the same as running the jobs one after another here. Sampled tokens do not
depend on the number of threads on this machine (the sample stage wrote byte-identical files on 1 and 2
threads); a test checks that ``workers=2`` writes the same samples as ``workers=1``.

A worker keeps the last two models it used (:func:`cached`), so the jobs of one model load it once per worker
(``Workers(1)`` keeps it in this process until :meth:`Workers.close`).
Under a launch or with a GPU, use one worker (the default): a GPU is shared by nothing here.
"""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

_CACHE: OrderedDict[Any, Any] = OrderedDict()
KEEP = 2
"""Values :func:`cached` keeps per process: a policy and its reference (the eval's KL jobs need both)."""


def cached(key: Any, build: Callable[[], Any]) -> Any:
    """In a worker: ``build()`` once per ``key``, keeping the :data:`KEEP` values used last (models, mostly)."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    while len(_CACHE) >= KEEP:
        _CACHE.popitem(last=False)
    _CACHE[key] = value = build()
    return value


class WorkerError(RuntimeError):
    """A job that failed in a worker with an exception that cannot travel back as itself, or a worker that died."""


def sendable(error: BaseException, wrap: Callable[[str], BaseException]) -> BaseException:
    """``error`` itself when it pickles (to be raised again in the parent process), else ``wrap("Type: message")``."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return wrap(f"{type(error).__name__}: {error}")


def _worker_main(threads: int, jobs, results) -> None:
    import torch

    torch.set_num_threads(threads)
    while True:
        task = jobs.get()
        if task is None:
            return
        index, fn, args = task
        try:
            results.put((index, True, fn(*args)))
        except BaseException as e:
            results.put((index, False, (sendable(e, WorkerError), traceback.format_exc())))


def threads_per_worker(workers: int) -> int:
    """Each worker's torch threads: this process's threads shared out (at least one each)."""
    import torch

    return max(1, torch.get_num_threads() // workers)


def cpu_sampling_workers() -> int:
    """The demo's ``workers`` for its sampling stages: 2 on a CPU with at least 2 threads, else 1 (a GPU, or one
    thread). Measured on 2 cores in fp32 only (see the module docstring); on more cores each of the 2 gets half."""
    import torch

    from rlhfkit.modeling import models

    return 2 if models.inference_device().type == "cpu" and torch.get_num_threads() >= 2 else 1


class Workers:
    """``count`` spawned processes that run jobs from one queue; started on first use, ended by :meth:`close`
    (or the ``with`` block). ``count`` 1 runs every job here, in this process."""

    def __init__(self, count: int = 1):
        if count < 1:
            raise ValueError(f"workers must be at least 1, got {count}")
        self.count = count
        self._procs: list = []
        self._jobs = self._results = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(stop=kind is not None)

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._jobs, self._results = ctx.Queue(), ctx.Queue()
        threads = threads_per_worker(self.count)
        for _ in range(self.count):
            p = ctx.Process(target=_worker_main, args=(threads, self._jobs, self._results), daemon=True)
            p.start()
            self._procs.append(p)

    def imap(self, fn: Callable[..., Any], args: Sequence[tuple]) -> Iterator[Any]:
        """``fn(*a)`` for each ``a`` of ``args``, yielded in order as they finish (a result that comes early
        waits for those before it). A job's exception is raised here, with the worker's traceback as a note."""
        if self.count == 1:
            for a in args:
                yield fn(*a)
            return
        if not self._procs:
            self._start()
        for i, a in enumerate(args):
            self._jobs.put((i, fn, a))
        done: dict[int, tuple[bool, Any]] = {}
        for want in range(len(args)):
            while want not in done:
                try:
                    index, ok, value = self._results.get(timeout=5)
                except queue.Empty:
                    dead = [p.exitcode for p in self._procs if not p.is_alive()]
                    if dead:
                        self.close(stop=True)
                        raise WorkerError(f"a sampling worker process ended without finishing (exit code {dead[0]})") from None
                    continue
                done[index] = (ok, value)
            ok, value = done.pop(want)
            if not ok:
                error, trace = value
                self.close(stop=True)
                if hasattr(error, "add_note"):
                    error.add_note("raised in a sampling worker:\n" + trace.rstrip())
                raise error
            yield value

    def close(self, *, stop: bool = False) -> None:
        """End the workers once they are idle, or at once (``stop``: after an error, jobs may still be queued).
        With one worker (this process) the model its jobs kept goes."""
        _CACHE.clear()
        for p in self._procs:
            if stop:
                p.terminate()
            elif p.is_alive():
                self._jobs.put(None)
        for p in self._procs:
            p.join(timeout=None if stop else 30)
            if p.is_alive():
                p.terminate()
                p.join()
        self._procs = []
