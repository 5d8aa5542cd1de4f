"""Crash and full-disk checks of the resumable stages: kill -9 then resume, and ENOSPC mid-write.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reliability_kill.py            # 22 kill points + 7 full-disk cases
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reliability_kill.py --quick    # smoke test: 6 kill points + 3 cases
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reliability_kill.py --fresh-processes --keep

Two of the four parts of ``benchmarks/reliability.py`` (which imports :func:`run`);
run on demand, not by the tests. Everything runs on the tiny random model
(``model: tiny``, fp32 on CPU) in a temp directory; each row of the table is one
check: how many cases, how many passed, and why the others failed.

**kill -9, then resume** (rows ``kill -9 + resume: STAGE``). For each of ``sft``,
``reward``, ``dpo``, ``ppo``, ``sample`` and ``label``, the stage first runs to
completion once through the real ``rlhfkit`` console script (the reference).
Then for each kill point it starts the same command in a fresh directory, polls
that directory every few milliseconds, SIGKILLs the process when the point's
trigger fires (a checkpoint's ``.tmp-step-N`` directory appearing, the final
save's ``.save.*`` directory, the label stage's temp file of an atomic rewrite,
DPO's reference-log-prob cache file, a JSONL file growing past N lines, or N lines
plus a random delay), records what the kill left (inside which write it landed:
a temp checkpoint and its partial files, a temp save, a torn JSONL line), and
reruns the same command to completion (``resume: auto``, the default). A kill
point passes when the rerun exits 0 and its outputs equal the reference:

* trainers: every tensor of ``model.safetensors`` (and PPO's ``value_head.safetensors``)
  bitwise equal (the max abs difference is reported otherwise), the save's
  completion marker present, ``metrics.jsonl`` holding the reference's records,
  step for step (no duplicate, no gap) with equal values (timings aside), and PPO's
  ``samples.jsonl`` equal;
* ``sample``: ``samples.jsonl`` records equal; ``label``: the labels file's records equal.

A single ``write()`` of a few hundred bytes is not torn by SIGKILL, so three
points also *simulate* a torn append after the kill (what a power loss or a
full disk leaves): the last line of ``metrics.jsonl`` / PPO's ``samples.jsonl``
cut in half, or for the sample stage a cut inside the last batch's records.
Temp files a killed write leaves behind and the rerun does not remove are
reported as notes, not failures. With ``full`` mode a ``determinism`` row first
reruns every stage uninterrupted and compares it with the reference: a kill
point can only be expected to match if that does.

**full disk** (rows ``ENOSPC: ...``). In the stage's process (see
:func:`_install_injection`) every file opened for writing, ``torch.save`` and
``safetensors.torch.save_file`` go through a byte budget that is armed at a chosen
moment -- entering the step-6 checkpoint, the final ``save_pretrained``, the
step-8 metrics append, the 4th labels save, the samples file after 6 batches and
2 records -- and then lets N more bytes through, writes a short prefix and raises
``OSError(ENOSPC, "No space left on device")`` (so a file is cut exactly as a
filling disk cuts it). Checked: the run fails with one clear line on stderr
naming the problem and no Python traceback (the CLI prints its known errors
that way); the last good state is intact (the previous checkpoint, no marker
on the half-written model, every label and sample written before); and a rerun
without the budget ("space freed") resumes from that state and finishes equal
to the reference. One more case (``EFBIG``) sets ``RLIMIT_FSIZE`` instead, so the
write fails inside the real library writers (torch's C++ zip writer,
safetensors' Rust writer) rather than in the emulation -- that shows the error
text a real full disk gives, with EFBIG instead of ENOSPC.

Fidelity and speed: importing torch + transformers costs ~9 s per process on this
2-core machine, so besides the references (always the real console script) every
run is a fork of a small server process (``reliability_kill.py --zygote``, which
imported rlhfkit, torch and transformers once and runs nothing else) calling
``rlhfkit.cli.main(argv)`` -- the same code the console script runs, in its own
process, SIGKILLed by pid; the ``determinism`` row checks such a fork gives the
reference's outputs. ``--fresh-processes`` runs every case as its own
``rlhfkit`` process instead (injected cases as ``python reliability_kill.py
--child SPEC``), ~9 s more per run. Full mode takes 5-6 min on 2 busy cores,
quick mode ~2.5 min.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SEED = 0
POLL_S = 0.003
RUN_TIMEOUT_S = 600.0

# What a run's environment gets on top of the caller's (the Makefile's settings for the CLI).
RUN_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}

# Imported once by the fork server so a run does not pay the ~9 s of imports.
PRELOAD = [
    "torch",
    "numpy",
    "yaml",
    "safetensors.torch",
    "transformers",
    "accelerate",
    "tqdm.auto",
    "transformers.models.llama.modeling_llama",
    "rlhfkit.cli",
    "rlhfkit.config",
    "rlhfkit.modeling.models",
    "rlhfkit.training.loop",
    "rlhfkit.sft",
    "rlhfkit.reward",
    "rlhfkit.dpo",
    "rlhfkit.rl",
    "rlhfkit.sample",
    "rlhfkit.label",
    "rlhfkit.feedback.simulated",
    "rlhfkit.feedback.scorers",
]

TRAINERS = ("sft", "reward", "dpo", "ppo")
STAGES = (*TRAINERS, "sample", "label")


# Metric keys that are wall-clock measurements, so differ between any two runs.
def _volatile(key: str) -> bool:
    return key == "time" or key.startswith("time_") or key.endswith("_per_s")


# ============================================================================ data and configs


def _demo(name: str) -> Path:
    return REPO / "src" / "rlhfkit" / "assets" / "demo" / name


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def write_pairs(path: Path, n: int = 64) -> Path:
    """``n`` preference pairs from the shipped SFT demo set: chosen = its completion, rejected = another prompt's."""
    rows = [r for r in _read_jsonl(_demo("sft.jsonl")) if isinstance(r.get("completion"), str)]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            row, other = rows[i % len(rows)], rows[(7 * i + 3) % len(rows)]
            f.write(json.dumps({"prompt": row["prompt"], "chosen": row["completion"], "rejected": other["completion"]}) + "\n")
    return path


def write_label_items(path: Path, n: int) -> Path:
    """``n`` items to label (``prompt`` + two ``responses``) built from the demo prompts and completions.

    Labelling the tiny model's own samples takes a fraction of a second; this many
    items keep the label stage running (and rewriting its output) long enough to be killed.
    """
    prompts = [r["prompt"] for r in _read_jsonl(_demo("prompts_train.jsonl"))]
    completions = [r["completion"] for r in _read_jsonl(_demo("sft.jsonl")) if isinstance(r.get("completion"), str)]
    rng = random.Random(SEED)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            responses = []
            for _ in range(2):
                words = rng.choice(completions).split()
                responses.append(" ".join(words[: rng.randint(3, len(words))]))
            f.write(json.dumps({"prompt": prompts[i % len(prompts)], "responses": responses}) + "\n")
    return path


def stage_configs(work: Path) -> dict[str, dict[str, Any]]:
    """Each stage's config.yaml: small runs with frequent checkpoints and mid-run evaluations."""
    pairs = str(write_pairs(work / "pairs.jsonl"))
    items = str(write_label_items(work / "label_items.jsonl", 1500))
    trainer = dict(
        model="tiny", precision="fp32", progress=False, tensorboard=False, max_length=64, batch_size=4, keep_checkpoints=2
    )
    return {
        "sft": {**trainer, "max_steps": 12, "save_every": 3, "eval_fraction": 0.05, "eval_every": 4, "lr": 3e-3},
        "reward": {
            **trainer,
            "data": pairs,
            "max_steps": 8,
            "save_every": 2,
            "eval_fraction": 0.1,
            "eval_every": 4,
            "lr": 1e-3,
            "norm_max_samples": 32,
        },
        "dpo": {**trainer, "data": pairs, "max_steps": 8, "save_every": 2, "eval_fraction": 0.1, "eval_every": 4, "lr": 1e-3},
        "ppo": {
            "policy": "tiny",
            "precision": "fp32",
            "progress": False,
            "tensorboard": False,
            "max_steps": 8,
            "save_every": 2,
            "keep_checkpoints": 2,
            "batch_size": 4,
            "max_new_tokens": 16,
            "lr": 1e-4,
            "log_samples": 2,
        },
        "sample": {
            "model": "tiny",
            "precision": "fp32",
            "progress": False,
            "batch_size": 4,
            "max_prompts": 48,
            "max_new_tokens": 24,
        },
        "label": {"samples": items, "chunk_size": 50, "seed": 0},
    }


def output_file(stage: str) -> str | None:
    """The file a non-training stage writes inside its ``out`` directory."""
    return {"sample": "samples.jsonl", "label": "labels.jsonl"}.get(stage)


def stage_argv(stage: str, config: Path, out: Path) -> list[str]:
    """``rlhfkit`` arguments: the stage, its config.yaml, and where its output goes."""
    name = output_file(stage)
    override = f"output={out / name}" if name else f"output_dir={out}"
    return [stage, str(config), override]


# ============================================================================ in-process fault injection (the child)


class _Budget:
    """Bytes the "disk" still takes once armed; ``match``: only files whose name ends so count (None: all)."""

    def __init__(self) -> None:
        self.armed = False
        self.left = 0
        self.match: str | None = None
        self.hit = False

    def arm(self, budget: int, match: str | None = None) -> None:
        self.armed, self.left, self.match = True, int(budget), match

    def counts(self, name: str) -> bool:
        return self.armed and (self.match is None or str(name).endswith(self.match))


_BUDGET = _Budget()


class _BudgetRaw(io.RawIOBase):
    """A raw file that stops taking bytes when the budget runs out: a short write, then ENOSPC."""

    def __init__(self, raw: io.FileIO, counted: bool):
        super().__init__()
        self._raw, self._counted = raw, counted

    @property
    def name(self):
        return self._raw.name

    @property
    def mode(self):
        return self._raw.mode

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def fileno(self) -> int:
        return self._raw.fileno()

    def isatty(self) -> bool:
        return False

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._raw.seek(pos, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def truncate(self, size: int | None = None) -> int:
        return self._raw.truncate(size)

    def write(self, b) -> int:
        data = bytes(b)
        if not self._counted:
            return self._raw.write(data)
        if _BUDGET.left <= 0:
            _BUDGET.hit = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(2) reports it: no file name
        data = data[: _BUDGET.left]
        written = self._raw.write(data) or 0
        _BUDGET.left -= written
        return written

    def close(self) -> None:
        if not self.closed:
            try:
                super().close()
            finally:
                self._raw.close()


_REAL_OPEN = io.open


def _budget_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
    """``open`` whose write-only files (``w``/``a``/``x``) go through the byte budget once it is armed."""
    if not _BUDGET.armed or "+" in mode or not any(c in mode for c in "wax"):
        return _REAL_OPEN(file, mode, buffering, encoding, errors, newline, closefd, opener)
    name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
    raw = io.FileIO(file, mode.replace("b", "").replace("t", ""), closefd=closefd, opener=opener)
    wrapped = _BudgetRaw(raw, _BUDGET.counts(name))
    if buffering == 0:
        return wrapped
    buffered = io.BufferedWriter(wrapped, io.DEFAULT_BUFFER_SIZE if buffering in (-1, 1) else buffering)
    if "b" in mode:
        return buffered
    text = io.TextIOWrapper(buffered, io.text_encoding(encoding), errors, newline, line_buffering=buffering == 1)
    text.mode = mode
    return text


def _rebind(old: Any, new: Any) -> None:
    """Point every module-level reference to ``old`` (``from x import f as g`` included) at ``new``."""
    for module in list(sys.modules.values()):
        try:
            names = [k for k, v in vars(module).items() if v is old]
        except TypeError:
            continue
        for name in names:
            setattr(module, name, new)


def _install_injection(spec: dict[str, Any]) -> None:
    """Arrange the fault ``spec`` describes, before the stage runs (in the child process).

    ``spec["arm"]``: when the budget (or the file-size limit) starts counting --
    ``checkpoint`` (entering ``Checkpointer.save`` for ``spec["step"]``), ``final_save`` (entering
    ``models.save_pretrained``), ``metrics`` (entering ``MetricsLogger.log`` for ``spec["step"]``),
    ``labels`` (the ``spec["call"]``-th ``save_comparisons`` of the label stage) or ``now``.
    ``spec["kind"]``: ``enospc`` (the byte budget ``spec["budget"]``, counting files ending in
    ``spec.get("match")``) or ``fsize`` (``RLIMIT_FSIZE`` = ``spec["limit"]``, SIGXFSZ ignored: EFBIG).
    """
    import builtins

    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from rlhfkit import label
    from rlhfkit.modeling import models
    from rlhfkit.training import loop, tracking

    def fire() -> None:
        if spec["kind"] == "fsize":
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (spec["limit"], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        elif not _BUDGET.armed:
            _BUDGET.arm(spec["budget"], spec.get("match"))

    if spec["kind"] == "enospc":
        builtins.open = io.open = _budget_open
        real_torch_save, real_save_file = torch.save, safetensors.torch.save_file

        def torch_save(obj, f, *args, **kwargs):
            if _BUDGET.armed and isinstance(f, (str, os.PathLike)):
                with _budget_open(f, "wb") as handle:
                    return real_torch_save(obj, handle, *args, **kwargs)
            return real_torch_save(obj, f, *args, **kwargs)

        def save_file(tensors, filename, metadata=None):
            if not _BUDGET.armed:
                return real_save_file(tensors, filename, metadata)
            data = safetensors.torch.save(tensors, metadata=metadata)
            try:
                with _budget_open(filename, "wb") as handle:
                    handle.write(data)
            except OSError as e:  # what the real (Rust) writer raises on a full disk
                raise SafetensorError(f"Error while serializing: I/O error: {e.strerror} (os error {e.errno})") from None

        _rebind(real_torch_save, torch_save)
        _rebind(real_save_file, save_file)

    arm = spec["arm"]
    if arm == "now":
        fire()
    elif arm == "checkpoint":
        real = loop.Checkpointer.save

        def save(self, step, state):
            if step == spec["step"]:
                fire()
            return real(self, step, state)

        loop.Checkpointer.save = save
    elif arm == "final_save":
        real_pretrained = models.save_pretrained

        def save_pretrained(*args, **kwargs):
            fire()
            return real_pretrained(*args, **kwargs)

        models.save_pretrained = save_pretrained
    elif arm == "metrics":
        real_log = tracking.MetricsLogger.log

        def log(self, step, metrics):
            if step == spec["step"]:
                fire()
            return real_log(self, step, metrics)

        tracking.MetricsLogger.log = log
    elif arm == "labels":
        real_comparisons, calls = label.save_comparisons, [0]

        def save_comparisons(*args, **kwargs):
            calls[0] += 1
            if calls[0] == spec["call"]:
                fire()
            return real_comparisons(*args, **kwargs)

        label.save_comparisons = save_comparisons
    else:
        raise ValueError(f"unknown arm {arm!r}")


def _child_main(argv: list[str], log_dir: str, inject: dict | None) -> None:
    """A run: stdout/stderr to ``log_dir``, the fault installed, then ``rlhfkit.cli.main(argv)``; exits with its code.

    An exception the CLI does not handle is printed as Python prints it (a traceback) and exits 1, as the
    console script would.
    """
    log = Path(log_dir)
    log.mkdir(parents=True, exist_ok=True)
    for fd, name in ((1, "stdout.log"), (2, "stderr.log")):
        handle = os.open(log / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # also closes the fork server's request pipe in this process
    os.close(null)
    sys.stdin = open(os.devnull)
    os.chdir(log)
    rc = 1
    try:
        if inject:
            _install_injection(inject)
        from rlhfkit import cli

        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - what an uncaught exception does in the real CLI
        traceback.print_exc()
        rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


# ============================================================================ launching runs (the parent)


def _zygote() -> None:
    """The fork server (``reliability_kill.py --zygote``): imports :data:`PRELOAD` once, then serves one JSON
    request per stdin line with one JSON reply line: ``start`` (fork a run: :func:`_child_main`), ``poll``
    (its exit code, or null while it runs) and ``wait`` (the same, blocking up to ``timeout`` seconds).
    Only this process forks, and it runs no torch op itself, so a fork starts as clean as a fresh process."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a run imports it again and reports the error itself
            print(f"zygote: cannot preload {name}: {e}", file=sys.stderr)
    reply = sys.stdout
    codes: dict[int, int] = {}

    def reap(pid: int, block_s: float) -> int | None:
        deadline = time.perf_counter() + block_s
        while pid not in codes:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
            elif time.perf_counter() >= deadline:
                return None
            else:
                time.sleep(0.01)
        return codes[pid]

    print("ready", file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "start":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child_main(request["argv"], request["log_dir"], request["inject"])  # never returns
            answer: dict[str, Any] = {"pid": pid}
        else:
            answer = {"rc": reap(request["pid"], request.get("timeout", 0.0) if op == "wait" else 0.0)}
        print(json.dumps(answer), file=reply, flush=True)


class _ForkServer:
    """The parent's end of :func:`_zygote`."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the fork server did not start")

    def call(self, **request) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


class Run:
    """A stage process: a fork of the server, or an ``rlhfkit`` subprocess."""

    def __init__(self, log_dir: Path, *, popen: subprocess.Popen | None = None, server: _ForkServer | None = None, pid: int = 0):
        self.log_dir, self.popen, self.server = log_dir, popen, server
        self.pid = popen.pid if popen is not None else pid

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return self.server.call(op="poll", pid=self.pid)["rc"] is None

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        """The exit code (negative: killed by that signal); a run past ``timeout`` is killed and gives -999."""
        if self.popen is not None:
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.popen.wait()
                return -999
        rc = self.server.call(op="wait", pid=self.pid, timeout=timeout)["rc"]
        if rc is None:
            self.kill()
            self.server.call(op="wait", pid=self.pid, timeout=60)
            return -999
        return rc

    def stdout(self) -> str:
        return self._log("stdout.log")

    def stderr(self) -> str:
        return self._log("stderr.log")

    def _log(self, name: str) -> str:
        path = self.log_dir / name
        return path.read_text(errors="replace") if path.exists() else ""


class Launcher:
    """Starts runs: the real console script, or forks of a server that imported rlhfkit once."""

    def __init__(self, fresh_processes: bool = False):
        self.fresh = fresh_processes
        self.env = {**os.environ, **RUN_ENV}
        self.env.setdefault("OMP_NUM_THREADS", "1")
        exe = Path(sys.executable).with_name("rlhfkit")
        self.rlhfkit = str(exe if exe.exists() else REPO / ".venv" / "bin" / "rlhfkit")
        self._server: _ForkServer | None = None

    def cli(self, argv: list[str], log_dir: Path) -> Run:
        """The real ``rlhfkit`` console script."""
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "stdout.log", "w") as out, open(log_dir / "stderr.log", "w") as err:
            proc = subprocess.Popen(
                [self.rlhfkit, *argv], stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env, cwd=log_dir
            )
        return Run(log_dir, popen=proc)

    def start(self, argv: list[str], log_dir: Path, inject: dict | None = None) -> Run:
        log_dir.mkdir(parents=True, exist_ok=True)
        if self.fresh:
            if inject is None:
                return self.cli(argv, log_dir)
            spec = json.dumps({"argv": argv, "log_dir": str(log_dir), "inject": inject})
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--child", spec], stdin=subprocess.DEVNULL, env=self.env, cwd=log_dir
            )
            return Run(log_dir, popen=proc)
        if self._server is None:
            self._server = _ForkServer(self.env)
        pid = self._server.call(op="start", argv=argv, log_dir=str(log_dir), inject=inject)["pid"]
        return Run(log_dir, server=self._server, pid=pid)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


# ============================================================================ triggers and the state a kill left


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


class Trigger:
    """When to kill: ``fired(out)`` is polled every few ms while the run is alive."""

    def fired(self, out: Path) -> bool:
        raise NotImplementedError


@dataclass
class Exists(Trigger):
    """A path matching ``pattern`` (a glob under ``out``) exists, once ``after`` has fired (if given)."""

    pattern: str
    after: Trigger | None = None

    def fired(self, out: Path) -> bool:
        if self.after is not None and not self.after.fired(out):
            return False
        self.after = None  # latched
        return next(iter(out.glob(self.pattern)), None) is not None


@dataclass
class Lines(Trigger):
    """``out/name`` holds at least ``n`` lines."""

    name: str
    n: int

    def fired(self, out: Path) -> bool:
        return _lines(out / self.name) >= self.n


@dataclass
class Size(Trigger):
    """``out/name`` is at least ``n`` bytes."""

    name: str
    n: int

    def fired(self, out: Path) -> bool:
        try:
            return (out / self.name).stat().st_size >= self.n
        except OSError:
            return False


@dataclass
class Grows(Trigger):
    """``out/name`` grows (an append just happened) once it holds at least ``n`` lines."""

    name: str
    n: int
    _size: int | None = None

    def fired(self, out: Path) -> bool:
        path = out / self.name
        try:
            size = path.stat().st_size
        except OSError:
            return False
        if self._size is None:
            if _lines(path) >= self.n:
                self._size = size
            return False
        return size > self._size


@dataclass
class KillPoint:
    stage: str
    what: str
    trigger: Trigger
    delay_s: float = 0.0
    tear: str | None = None
    """After the kill, simulate a torn append: ``last`` (cut the last line of ``tear_file`` in half),
    ``batch_start`` / ``batch_mid`` (sample stage: cut inside the first / third record of its last batch)."""
    tear_file: str = ""


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def describe_state(out: Path, stage: str, ref_out: Path) -> tuple[str, bool]:
    """What a kill left in ``out``: a short description, and whether it landed inside a write."""
    found = []
    ckpts = out / "checkpoints"
    ref_sizes: dict[str, int] = {}
    for done in sorted((ref_out / "checkpoints").glob("step-*"))[-1:]:
        ref_sizes = {p.name: p.stat().st_size for p in done.iterdir() if p.is_file()}
    for tmp in sorted(ckpts.glob(".tmp-step-*")):
        files = []
        for p in sorted(tmp.iterdir()):
            size, full = p.stat().st_size, ref_sizes.get(p.name)
            files.append(f"{p.name} {_mb(size)}" + (f"/{_mb(full)}" if full and size != full else ""))
        found.append(f"checkpoint write ({tmp.name}: {', '.join(files) or 'empty'})")
    for tmp in sorted(out.glob(".save.*")):
        found.append(f"final save (temp dir with {len(list(tmp.iterdir()))} files)")
    if stage in TRAINERS and (out / "model.safetensors").exists() and not (out / "rlhfkit_complete.json").exists():
        found.append("final save (files moved in, no completion marker)")
    for tmp in sorted((out / ".rlhfkit-cache").glob(".*.tmp")):
        found.append(f"reference-cache write ({_mb(tmp.stat().st_size)})")
    for tmp in sorted(out.glob(".labels.jsonl.*")):
        found.append(f"labels rewrite (temp file {_mb(tmp.stat().st_size)})")
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = out / name
        if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            found.append(f"JSONL append ({name} ends in a torn line)")
    if found:
        return "; ".join(found), True
    steps = sorted(p.name for p in ckpts.glob("step-*"))
    lines = {n: _lines(out / n) for n in ("metrics.jsonl", "samples.jsonl", "labels.jsonl") if (out / n).exists()}
    where = ", ".join([*(f"{n}: {k} lines" for n, k in lines.items()), *(["last checkpoint " + steps[-1]] if steps else [])])
    return f"between writes ({where or 'nothing written yet'})", False


def tear_jsonl(path: Path, mode: str, batch_size: int = 1) -> str:
    """Cut a JSONL file inside one of its records (see :attr:`KillPoint.tear`); returns what was cut."""
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")
    complete = lines if data.endswith(b"\n") else lines[:-1]
    n = len(complete)
    if n == 0:
        return "nothing to tear"
    if mode == "last":
        keep = n - 1
    else:
        start = ((n - 1) // batch_size) * batch_size
        keep = start if mode == "batch_start" else min(start + 2, n - 1)
    victim = complete[keep]
    cut = b"\n".join(complete[:keep]) + (b"\n" if keep else b"") + victim[: len(victim) // 2]
    path.write_bytes(cut)
    return f"cut {path.name} to {keep} lines + half of record {keep + 1} (of {n})"


# ============================================================================ comparing with the reference


def _tensor_diff(a_path: Path, b_path: Path) -> str | None:
    """None if the two safetensors files hold bitwise-equal tensors, else what differs."""
    from safetensors.torch import load_file

    a, b = load_file(str(a_path)), load_file(str(b_path))
    if a.keys() != b.keys():
        return f"{b_path.name}: tensor names differ ({sorted(a.keys() ^ b.keys())[:3]})"
    worst, name = 0.0, ""
    for k in a:
        if a[k].shape != b[k].shape:
            return f"{b_path.name}: {k} shape {tuple(b[k].shape)} != {tuple(a[k].shape)}"
        if not bool((a[k] == b[k]).all()):
            d = (a[k].double() - b[k].double()).abs().max().item()
            if d >= worst:
                worst, name = d, k
    return f"{b_path.name}: max abs diff {worst:.3g} ({name})" if name else None


def _records(path: Path) -> list[dict] | str:
    try:
        return _read_jsonl(path)
    except (OSError, ValueError) as e:
        return f"{path.name} unreadable: {e}"


def _compare_records(name: str, ref: list[dict] | str, got: list[dict] | str, *, volatile: bool = False) -> str | None:
    if isinstance(ref, str) or isinstance(got, str):
        return got if isinstance(got, str) else f"reference {ref}"

    def strip(r: dict) -> dict:
        return {k: v for k, v in r.items() if not (volatile and _volatile(k))}

    if len(ref) != len(got):
        return f"{name}: {len(got)} records, reference {len(ref)}"
    for i, (a, b) in enumerate(zip(ref, got)):
        if strip(a) != strip(b):
            keys = [k for k in sorted(strip(a).keys() | strip(b).keys()) if a.get(k) != b.get(k)]
            return f"{name}: record {i + 1} differs in {keys[:4]}"
    return None


def _metric_steps(records: list[dict]) -> str | None:
    """A problem with the training steps of metrics.jsonl: duplicates, gaps, wrong order."""
    evals = [r["step"] for r in records if any(k.startswith("eval_") for k in r)]
    steps = [r["step"] for r in records if not any(k.startswith("eval_") for k in r)]
    if steps != list(range(1, len(steps) + 1)):
        dup = sorted({s for s in steps if steps.count(s) > 1})
        return f"metrics.jsonl steps not 1..{len(steps)} once each (duplicates {dup[:5]}, got {steps[:20]})"
    if dup := sorted({s for s in evals if evals.count(s) > 1}):
        return f"metrics.jsonl has the eval record of step {dup} twice"
    return None


def compare_outputs(stage: str, out: Path, ref: Path) -> list[str]:
    """How the outputs of a finished run in ``out`` differ from the reference's; [] when equal."""
    problems: list[str] = []
    if stage in TRAINERS:
        from rlhfkit.modeling.models import is_complete_save

        for name in ("model.safetensors", *(["value_head.safetensors"] if stage == "ppo" else [])):
            if not (out / name).exists():
                problems.append(f"{name} missing")
            elif (diff := _tensor_diff(ref / name, out / name)) is not None:
                problems.append(diff)
        if not is_complete_save(out):
            problems.append("no completion marker (rlhfkit_complete.json) on the final save")
        got = _records(out / "metrics.jsonl")
        if not isinstance(got, str) and (bad := _metric_steps(got)):
            problems.append(bad)
        if diff := _compare_records("metrics.jsonl", _records(ref / "metrics.jsonl"), got, volatile=True):
            problems.append(diff)
        if stage == "ppo" and (
            diff := _compare_records("samples.jsonl", _records(ref / "samples.jsonl"), _records(out / "samples.jsonl"))
        ):
            problems.append(diff)
    else:
        name = output_file(stage)
        if diff := _compare_records(name, _records(ref / name), _records(out / name)):
            problems.append(diff)
    return problems


def leftovers(out: Path) -> list[str]:
    """Temp files and directories of interrupted writes still in ``out`` after a finished run."""
    found = [
        *out.glob("checkpoints/.tmp-step-*"),
        *out.glob(".save.*"),
        *out.glob(".labels.jsonl.*"),
        *out.glob(".samples.jsonl.*"),
        *out.glob(".rlhfkit-cache/.*.tmp"),
    ]
    return sorted(str(p.relative_to(out)) for p in found)


def _tail(text: str, n: int = 300) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-n:]


# ============================================================================ part 1: kill -9, then resume


def kill_points(quick: bool) -> list[KillPoint]:
    """The kill points; seeded, so every run of the benchmark kills at the same moments."""
    rng = random.Random(SEED)

    def jitter(lo: float, hi: float) -> float:
        return round(rng.uniform(lo, hi), 3)

    ck = "checkpoints/.tmp-step-{:07d}"
    points = [
        KillPoint("sft", "first checkpoint write (step 3), at once", Exists(ck.format(3))),
        KillPoint("sft", "checkpoint write (step 6), +40 ms", Exists(ck.format(6)), 0.04),
        KillPoint("sft", "checkpoint write (step 9), +120 ms", Exists(ck.format(9)), 0.12),
        KillPoint(
            "sft",
            "metrics.jsonl append (>= 7 lines), torn last line",
            Grows("metrics.jsonl", 7),
            tear="last",
            tear_file="metrics.jsonl",
        ),
        KillPoint("sft", "final model save", Exists(".save.*")),
        KillPoint("reward", "checkpoint write (step 4), +20 ms", Exists(ck.format(4)), 0.02),
        KillPoint("reward", "random: >= 5 metrics lines + delay", Lines("metrics.jsonl", 5), jitter(0.0, 0.3)),
        KillPoint("reward", "final model save", Exists(".save.*")),
        KillPoint("dpo", "just after the reference-cache write (the rerun reads it)", Exists(".rlhfkit-cache/*.safetensors")),
        KillPoint("dpo", "checkpoint write (step 6), +60 ms", Exists(ck.format(6)), 0.06),
        KillPoint("dpo", "random: >= 3 metrics lines + delay", Lines("metrics.jsonl", 3), jitter(0.0, 0.3)),
        KillPoint("dpo", "just after checkpoint 4's rename", Exists("checkpoints/step-0000004")),
        KillPoint("ppo", "first checkpoint write (step 2), +30 ms", Exists(ck.format(2)), 0.03),
        KillPoint("ppo", "checkpoint write (step 6), at once", Exists(ck.format(6))),
        KillPoint(
            "ppo",
            "samples.jsonl append (>= 6 lines), torn last line",
            Grows("samples.jsonl", 6),
            tear="last",
            tear_file="samples.jsonl",
        ),
        KillPoint("ppo", "final model save", Exists(".save.*")),
        KillPoint("sample", "random: >= 5 records + delay", Lines("samples.jsonl", 5), jitter(0.0, 0.4)),
        KillPoint(
            "sample",
            "append (>= 20 records), torn inside the last batch's first record",
            Grows("samples.jsonl", 20),
            tear="batch_start",
            tear_file="samples.jsonl",
        ),
        KillPoint(
            "sample",
            "append (>= 32 records), torn inside the last batch's third record",
            Grows("samples.jsonl", 32),
            tear="batch_mid",
            tear_file="samples.jsonl",
        ),
        KillPoint(
            "label", "labels rewrite in progress (file >= 100 kB)", Exists(".labels.jsonl.*", after=Size("labels.jsonl", 100_000))
        ),
        KillPoint(
            "label", "labels rewrite in progress (file >= 400 kB)", Exists(".labels.jsonl.*", after=Size("labels.jsonl", 400_000))
        ),
        KillPoint("label", "random: file >= 50 kB + delay", Size("labels.jsonl", 50_000), jitter(0.0, 0.3)),
    ]
    if quick:
        keep = {
            "checkpoint write (step 6), +40 ms",
            "random: >= 5 metrics lines + delay",
            "checkpoint write (step 6), +60 ms",
            "checkpoint write (step 6), at once",
            "append (>= 20 records), torn inside the last batch's first record",
            "labels rewrite in progress (file >= 100 kB)",
        }
        points = [p for p in points if p.what in keep]
    return points


@dataclass
class Row:
    check: str
    cases: int = 0
    passed: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "cases": self.cases,
            "passed": self.passed,
            "failures": self.failures,
            "seconds": round(self.seconds, 1),
            "notes": self.notes,
        }


def _wait_for(run: Run, out: Path, trigger: Trigger, timeout: float = RUN_TIMEOUT_S) -> bool:
    """Poll until ``trigger`` fires (True) or the run ends (False)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if trigger.fired(out):
            return True
        if not run.alive():
            return False
        time.sleep(POLL_S)
    return False


def run_kill_point(
    launcher: Launcher, point: KillPoint, config: Path, ref_out: Path, run_dir: Path, batch_size: int
) -> tuple[list[str], str, bool, list[str]]:
    """Kill at ``point``, rerun to completion, compare: (failures, where the kill landed, inside a write?, notes)."""
    out = run_dir / "out"
    out.mkdir(parents=True, exist_ok=True)
    argv = stage_argv(point.stage, config, out)
    first = launcher.start(argv, run_dir / "killed")
    if not _wait_for(first, out, point.trigger):
        rc = first.wait()
        return [f"{point.what}: the run ended (exit {rc}) before the kill point was reached"], "missed", False, []
    if point.delay_s:
        time.sleep(point.delay_s)
    if not first.alive():
        first.wait()
        return [f"{point.what}: the run ended before the kill (+{point.delay_s * 1000:.0f} ms delay)"], "missed", False, []
    first.kill()
    rc = first.wait()
    landed, inside = describe_state(out, point.stage, ref_out)
    if rc != -signal.SIGKILL:
        return [f"{point.what}: killed run exited {rc}, not by SIGKILL: {_tail(first.stderr())}"], landed, inside, []
    notes = []
    if point.tear:
        notes.append(
            f"{point.stage} / {point.what}: simulated tear: " + tear_jsonl(out / point.tear_file, point.tear, batch_size)
        )
    second = launcher.start(argv, run_dir / "resumed")
    rc = second.wait()
    if rc != 0:
        return [f"{point.what}: the rerun failed (exit {rc}): {_tail(second.stderr())}"], landed, inside, notes
    problems = [f"{point.what} [{landed}]: {p}" for p in compare_outputs(point.stage, out, ref_out)]
    if left := leftovers(out):
        notes.append(f"{point.stage} / {point.what}: left behind after the rerun: {', '.join(left)}")
    return problems, landed, inside, notes


def _references(launcher: Launcher, work: Path, configs: dict[str, Path], verbose: bool) -> tuple[dict[str, Path], Row]:
    """Every stage once, uninterrupted, through the real console script."""
    refs, row, t0 = {}, Row("reference runs (real rlhfkit CLI)"), time.perf_counter()
    for stage in STAGES:
        out = work / "ref" / stage / "out"
        out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        run = launcher.cli(stage_argv(stage, configs[stage], out), work / "ref" / stage)
        rc = run.wait()
        row.cases += 1
        if rc == 0:
            row.passed += 1
            refs[stage] = out
        else:
            row.failures.append(f"{stage}: exit {rc}: {_tail(run.stderr())}")
        if verbose:
            print(f"  reference {stage}: exit {rc}, {time.perf_counter() - t:.1f} s", flush=True)
    row.seconds = time.perf_counter() - t0
    return refs, row


def determinism_row(launcher: Launcher, work: Path, configs: dict[str, Path], refs: dict[str, Path], verbose: bool) -> Row:
    """Each stage rerun uninterrupted (a fork of the server) against the reference (the real CLI)."""
    row, t0 = Row("determinism: uninterrupted rerun == reference"), time.perf_counter()
    for stage, ref in refs.items():
        out = work / "again" / stage / "out"
        out.mkdir(parents=True, exist_ok=True)
        run = launcher.start(stage_argv(stage, configs[stage], out), work / "again" / stage)
        rc = run.wait()
        row.cases += 1
        problems = [f"exit {rc}: {_tail(run.stderr())}"] if rc else compare_outputs(stage, out, ref)
        if problems:
            row.failures += [f"{stage}: {p}" for p in problems]
        else:
            row.passed += 1
        if verbose:
            print(f"  again {stage}: {'ok' if not problems else problems}", flush=True)
    row.seconds = time.perf_counter() - t0
    return row


def kill_rows(
    launcher: Launcher, work: Path, configs: dict[str, Path], refs: dict[str, Path], stage_cfg: dict, quick: bool, verbose: bool
) -> list[Row]:
    rows = {stage: Row(f"kill -9 + resume: {stage}") for stage in STAGES}
    inside = {stage: 0 for stage in STAGES}
    for i, point in enumerate(kill_points(quick)):
        row = rows[point.stage]
        row.cases += 1
        if point.stage not in refs:
            row.failures.append(f"{point.what}: no reference run")
            continue
        t = time.perf_counter()
        problems, landed, was_inside, notes = run_kill_point(
            launcher,
            point,
            configs[point.stage],
            refs[point.stage],
            work / f"kill-{i:02d}-{point.stage}",
            stage_cfg[point.stage].get("batch_size", 1),
        )
        row.seconds += time.perf_counter() - t
        row.failures += problems
        row.notes += notes
        row.passed += not problems
        inside[point.stage] += was_inside
        row.notes.append(f"{point.stage} / {point.what}: landed: {landed}")
        if verbose:
            print(
                f"  kill {i:2d} {point.stage:6s} {point.what}: {'ok' if not problems else 'FAIL'} "
                f"({time.perf_counter() - t:.1f} s) landed: {landed}",
                flush=True,
            )
            for p in problems:
                print(f"      {p}", flush=True)
    out = []
    for stage, row in rows.items():
        if row.cases:
            row.check += f" ({inside[stage]}/{row.cases} inside a write)"
            out.append(row)
    return out


# ============================================================================ part 2: a full disk


@dataclass
class DiskCase:
    name: str
    stage: str
    inject: dict[str, Any]
    expect: str
    """What the last good state is: ``checkpoint:STEP`` (resume from it), ``no_marker`` (final save), ``metrics:STEP``,
    ``labels:N`` (the first N labels kept), ``samples:N`` (the first N samples kept)."""


def disk_cases(quick: bool, refs: dict[str, Path], stage_cfg: dict) -> list[DiskCase]:
    cases = [
        DiskCase(
            "ENOSPC: sft checkpoint write (in model.safetensors)",
            "sft",
            {"kind": "enospc", "arm": "checkpoint", "step": 6, "budget": 5_000_000},
            "checkpoint:3",
        ),
        DiskCase(
            "ENOSPC: sft checkpoint write (in optimizer.bin)",
            "sft",
            {"kind": "enospc", "arm": "checkpoint", "step": 6, "budget": 20_000_000},
            "checkpoint:3",
        ),
        DiskCase(
            "ENOSPC: sft final model save", "sft", {"kind": "enospc", "arm": "final_save", "budget": 3_000_000}, "no_marker"
        ),
        DiskCase(
            "ENOSPC: sft metrics.jsonl append (step 8)",
            "sft",
            {"kind": "enospc", "arm": "metrics", "step": 8, "budget": 30, "match": "metrics.jsonl"},
            "metrics:8",
        ),
    ]
    chunk = stage_cfg["label"]["chunk_size"]
    if "label" in refs:  # the 4th save writes 4 chunks: half of that fits
        size = sum(len(line) + 1 for line in (refs["label"] / "labels.jsonl").read_bytes().split(b"\n")[: 4 * chunk])
        cases.append(
            DiskCase(
                "ENOSPC: labels save (4th chunk)",
                "label",
                {"kind": "enospc", "arm": "labels", "call": 4, "budget": size // 2},
                f"labels:{3 * chunk}",
            )
        )
    batch = stage_cfg["sample"]["batch_size"]
    if "sample" in refs:  # 6 batches and 2 records of the 7th fit, and 40 bytes of the next record
        kept = 6 * batch + 2
        size = sum(len(line) + 1 for line in (refs["sample"] / "samples.jsonl").read_bytes().split(b"\n")[:kept])
        cases.append(
            DiskCase(
                "ENOSPC: samples.jsonl append (mid-batch)",
                "sample",
                {"kind": "enospc", "arm": "now", "budget": size + 40, "match": "samples.jsonl"},
                f"samples:{kept}",
            )
        )
    cases.append(
        DiskCase(
            "EFBIG (RLIMIT_FSIZE 16 MB): sft checkpoint write, real writers",
            "sft",
            {"kind": "fsize", "arm": "checkpoint", "step": 6, "limit": 16_000_000},
            "checkpoint:3",
        )
    )
    if quick:
        keep = {
            "ENOSPC: sft checkpoint write (in optimizer.bin)",
            "ENOSPC: labels save (4th chunk)",
            "ENOSPC: samples.jsonl append (mid-batch)",
        }
        cases = [c for c in cases if c.name in keep]
    return cases


# stderr lines that are not the error: transformers' save warning, progress bars (tqdm redraws with \r).
_NOISE = re.compile(r"^\[RANK \d+\] Removed shared tensor|^Writing model shards|\|\s*\d+/\d+ \[|^\s*$")


def _error_problems(stderr: str) -> tuple[list[str], str]:
    """Whether stderr is one clear line naming a full disk and no traceback; the error line."""
    lines = [line for line in re.split(r"[\r\n]", stderr) if not _NOISE.search(line)]
    last = lines[-1].strip() if lines else ""
    problems = []
    if "Traceback (most recent call last)" in stderr:
        problems.append(f"the CLI printed a Python traceback ({len(lines)} lines), ending: {last[:200]!r}")
    elif not re.search(r"No space left|ENOSPC|disk is full|disk full|File too large|EFBIG|errno 2[78]", last, re.I):
        problems.append(f"the error does not name the full disk: {last[:200]!r}")
    return problems, last


def check_last_good(case: DiskCase, out: Path, ref_out: Path, stage_cfg: dict) -> list[str]:
    """Right after the failure: is the last good state intact?"""
    kind, _, value = case.expect.partition(":")
    problems = []
    if kind == "checkpoint":
        from rlhfkit.training.loop import Checkpointer, CheckpointError

        step = int(value)
        failed = out / "checkpoints" / f"step-{case.inject['step']:07d}"
        if failed.exists():
            problems.append(f"{failed.name} exists although its write failed")
        good = out / "checkpoints" / f"step-{step:07d}"
        try:
            Checkpointer._read(None, good)  # the file-size check resume does first (uses no instance state)
        except CheckpointError as e:
            problems.append(f"the previous checkpoint {good.name} is damaged: {e}")
    elif kind == "no_marker":
        from rlhfkit.modeling.models import is_complete_save

        if is_complete_save(out):
            problems.append("the half-written final save carries a completion marker")
    elif kind == "metrics":
        from rlhfkit.data.io import read_jsonl_records

        try:
            steps = [r["step"] for r in read_jsonl_records(out / "metrics.jsonl") if "loss" in r]
        except ValueError as e:
            return [f"metrics.jsonl unreadable after the failure: {e}"]
        if steps != list(range(1, int(value))):
            problems.append(f"metrics.jsonl holds steps {steps}, expected 1..{int(value) - 1}")
    elif kind in ("labels", "samples"):
        name = output_file(case.stage)
        n = int(value)
        raw = (out / name).read_bytes() if (out / name).exists() else b""
        text = raw.decode("utf-8", errors="replace")
        complete = text.split("\n")[:-1]
        if kind == "labels":
            from rlhfkit.data.preferences import load_comparisons

            try:
                count = len(load_comparisons(out / name))
            except ValueError as e:
                return [f"{name} does not parse after the failure: {e}"]
            if count != n:
                problems.append(f"{name} holds {count} labels after the failure, {n} were saved before it")
        try:
            got = [json.loads(line) for line in complete]
        except ValueError as e:
            return [f"{name}: a complete line does not parse after the failure: {e}"]
        ref = _read_jsonl(ref_out / name)[:n]
        if got[:n] != ref or len(got) < n:
            problems.append(
                f"{name}: the {n} records written before the failure are not all there / not equal ({len(got)} complete lines)"
            )
    return problems


def run_disk_case(
    launcher: Launcher, case: DiskCase, config: Path, ref_out: Path, run_dir: Path, stage_cfg: dict
) -> tuple[list[str], list[str]]:
    out = run_dir / "out"
    out.mkdir(parents=True, exist_ok=True)
    argv = stage_argv(case.stage, config, out)
    failed = launcher.start(argv, run_dir / "full", inject=case.inject)
    rc = failed.wait()
    if rc == 0:
        return ["the run did not fail: the injected write error was never hit or was swallowed"], []
    problems, last = _error_problems(failed.stderr())
    notes = [f"{case.name}: exit {rc}, last stderr line: {last[:240]!r}"]
    problems += check_last_good(case, out, ref_out, stage_cfg)
    if left := leftovers(out):
        notes.append(f"{case.name}: left behind by the failed write: {', '.join(left)}")
    again = launcher.start(argv, run_dir / "freed")
    rc = again.wait()
    if rc != 0:
        return problems + [f"the rerun after freeing space failed (exit {rc}): {_tail(again.stderr())}"], notes
    kind, _, value = case.expect.partition(":")
    if kind == "checkpoint":
        want = f"resumed from {out / 'checkpoints' / f'step-{int(value):07d}'} at step {int(value)}"
        if want not in again.stdout():
            problems.append(f"the rerun did not say '{want}': {_tail(again.stdout(), 200)}")
        if "cannot be loaded" in again.stdout():
            problems.append("the rerun found a checkpoint it could not load")
    problems += [f"after the rerun: {p}" for p in compare_outputs(case.stage, out, ref_out)]
    if left := leftovers(out):
        notes.append(f"{case.name}: still there after the rerun: {', '.join(left)}")
    return problems, notes


def disk_rows(
    launcher: Launcher, work: Path, configs: dict[str, Path], refs: dict[str, Path], stage_cfg: dict, quick: bool, verbose: bool
) -> list[Row]:
    rows = []
    for i, case in enumerate(disk_cases(quick, refs, stage_cfg)):
        row, t = Row(case.name, cases=1), time.perf_counter()
        if case.stage not in refs:
            row.failures.append("no reference run")
        else:
            problems, row.notes = run_disk_case(
                launcher, case, configs[case.stage], refs[case.stage], work / f"disk-{i:02d}-{case.stage}", stage_cfg
            )
            row.failures += problems
            row.passed = int(not problems)
        row.seconds = time.perf_counter() - t
        rows.append(row)
        if verbose:
            print(f"  disk {case.name}: {'ok' if row.passed else 'FAIL'} ({row.seconds:.1f} s)", flush=True)
            for p in row.failures:
                print(f"      {p}", flush=True)
    return rows


# ============================================================================ entry points


def run(
    quick: bool = False, *, fresh_processes: bool = False, keep: bool = False, verbose: bool = False, work_dir: str | None = None
) -> list[dict]:
    """Both parts; one dict per table row: check, cases, passed, failures, seconds (and notes: what each kill
    hit, simulated tears, temp files left behind, the error lines printed)."""
    import yaml

    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="reliability-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        stage_cfg = stage_configs(work)
        configs = {}
        for stage, cfg in stage_cfg.items():
            configs[stage] = work / f"{stage}.yaml"
            configs[stage].write_text(yaml.safe_dump(cfg, sort_keys=False))
        launcher = Launcher(fresh_processes)
        try:
            refs, ref_row = _references(launcher, work, configs, verbose)
            rows = [] if ref_row.passed == ref_row.cases else [ref_row]
            if not quick:
                rows.append(determinism_row(launcher, work, configs, refs, verbose))
            rows += kill_rows(launcher, work, configs, refs, stage_cfg, quick, verbose)
            rows += disk_rows(launcher, work, configs, refs, stage_cfg, quick, verbose)
        finally:
            launcher.close()
        if verbose:
            print(f"  (references: {ref_row.seconds:.0f} s; work dir {work})", flush=True)
        return [r.as_dict() for r in rows]
    finally:
        if not keep and not work_dir:
            shutil.rmtree(work, ignore_errors=True)


def print_rows(rows: list[dict]) -> None:
    headers = ["check", "cases", "passed", "seconds"]
    cells = [[r["check"], str(r["cases"]), str(r["passed"]), f"{r['seconds']:.0f}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(headers, *cells)]
    for k, row in enumerate([headers, *cells]):
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    for r in rows:
        for f in r["failures"]:
            print(f"FAIL {r['check']}: {f}")
    for r in rows:
        for n in r.get("notes", []):
            print(f"note: {n}")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":  # --fresh-processes: one injected run
        spec = json.loads(sys.argv[2])
        _child_main(spec["argv"], spec["log_dir"], spec["inject"])
    if sys.argv[1:] == ["--zygote"]:  # the fork server (Launcher)
        _zygote()
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 kill points and 3 full-disk cases (smoke test)")
    parser.add_argument(
        "--fresh-processes",
        action="store_true",
        help="every run its own rlhfkit process instead of a fork of a pre-imported server",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (printed)")
    parser.add_argument("--work-dir", help="use (and keep) this directory")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = run(args.quick, fresh_processes=args.fresh_processes, keep=args.keep, verbose=not args.quiet, work_dir=args.work_dir)
    print_rows(rows)
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    return 0 if all(r["passed"] == r["cases"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
