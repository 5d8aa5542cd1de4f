"""Sampling worker processes (rlhfkit.generation.workers): results in job order, errors raised here."""

from __future__ import annotations

import os

import pytest

from rlhfkit.generation import workers
from rlhfkit.generation.workers import WorkerError, Workers


def _square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"job {x} failed")
    return x


def _die(x: int) -> int:
    os._exit(7)


def _loads(key: str) -> int:
    return workers.cached(key, lambda: os.getpid() + len(key))


@pytest.mark.parametrize("count", [1, 2])
def test_results_come_back_in_job_order(count):
    with Workers(count) as pool:
        out = list(pool.imap(_square_and_pid, [(i,) for i in range(7)]))
    assert [v for v, _ in out] == [i * i for i in range(7)]
    pids = {p for _, p in out}
    assert (pids == {os.getpid()}) if count == 1 else (os.getpid() not in pids and len(pids) <= 2)


def test_a_jobs_exception_is_raised_here_with_the_workers_traceback():
    with Workers(2) as pool, pytest.raises(ValueError, match="job 3 failed") as caught:
        list(pool.imap(_fail_on_three, [(i,) for i in range(6)]))
    assert any("raised in a sampling worker" in note for note in getattr(caught.value, "__notes__", [""]))


def test_a_worker_that_dies_is_an_error_not_a_hang():
    with Workers(2) as pool, pytest.raises(WorkerError, match="exit code 7"):
        list(pool.imap(_die, [(i,) for i in range(2)]))


def test_one_worker_keeps_its_model_until_closed():
    pool = Workers(1)
    first = list(pool.imap(_loads, [("a",), ("a",)]))
    assert first[0] == first[1] and workers._CACHE
    pool.close()
    assert not workers._CACHE
    with pytest.raises(ValueError, match="at least 1"):
        Workers(0)


def test_the_cache_keeps_the_two_values_used_last():
    built = []

    def build(key):
        built.append(key)
        return key

    pool = Workers(1)
    for key in ["policy", "reference", "policy", "other", "policy", "reference"]:
        assert workers.cached(key, lambda k=key: build(k)) == key
    # "other" pushed out "reference" (used before the last "policy"); "policy" stayed throughout
    assert built == ["policy", "reference", "other", "reference"]
    pool.close()


class _Unpicklable(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = __import__("threading").Lock()  # a lock does not pickle


def test_an_error_travels_back_as_itself_or_named_in_the_wrapper():
    plain = ValueError("bad value")
    assert workers.sendable(plain, WorkerError) is plain
    wrapped = workers.sendable(_Unpicklable("no way back"), WorkerError)
    assert isinstance(wrapped, WorkerError) and str(wrapped) == "_Unpicklable: no way back"
