"""Data formats: reading, validating and tokenising every kind of record rlhfkit uses."""

from rlhfkit.data.io import DataError, read_rows, write_jsonl

__all__ = ["DataError", "read_rows", "write_jsonl"]
