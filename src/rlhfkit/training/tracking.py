"""Metrics: one JSON object per logged step in ``metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhfkit.data.io import append_jsonl, read_jsonl_records, truncate_jsonl_by_step, write_jsonl
from rlhfkit.run_layout import EVAL_PREFIX


class MetricsLogger:
    """Append-only metrics log for one run (main process only; others pass ``enabled=False``).

    ``metrics.jsonl`` gets ``{"step": int, "time": float, **metrics}`` per call.
    TensorBoard event files go to ``OUTPUT_DIR/tensorboard``.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def truncate_after(self, step: int, *, drop_at_step: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """Drop entries past ``step`` (a resumed run re-logs them), and the entries at ``step`` itself that
        ``drop_at_step`` picks (those the run wrote after its checkpoint at ``step``, which a run resumed from
        that checkpoint logs again), rewriting atomically."""
        if not self.enabled:
            return
        truncate_jsonl_by_step(self.path, step)
        if drop_at_step is not None and self.path.exists():
            records = read_jsonl_records(self.path)
            kept = [r for r in records if not (r.get("step", 0) == step and drop_at_step(r))]
            if len(kept) != len(records):
                write_jsonl(self.path, kept)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        for key, value in metrics.items():
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)  # JSON has no NaN/inf
            record[key] = value
        append_jsonl(self.path, record)
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def log_text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def is_eval_record(record: dict[str, Any]) -> bool:
    """Whether a ``metrics.jsonl`` entry is an evaluation's: besides ``step`` and ``time``, only ``eval_*`` keys."""
    keys = [k for k in record if k not in ("step", "time")]
    return bool(keys) and all(k.startswith(EVAL_PREFIX) for k in keys)


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All entries of ``OUTPUT_DIR/metrics.jsonl``."""
    return read_jsonl_records(Path(output_dir) / "metrics.jsonl")
