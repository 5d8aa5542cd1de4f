"""The names in a pipeline run's directory, which :mod:`rlhfkit.pipeline` writes and :mod:`rlhfkit.report` reads.

One definition for writer and reader, so renaming a stage or a file cannot silently empty a report section.
"""

from __future__ import annotations

POLICY_ALGORITHMS = ("dpo", "ppo", "grpo", "rloo")
"""Policy-optimisation stages; each is named, and writes to a directory named, after its algorithm."""
STAGES = ("sft", "sample", "label", "reward", "gate", *POLICY_ALGORITHMS, "eval", "report")
"""Every stage a pipeline can have, in order (a run has the policy stages it asks for)."""
GATE_FILE = "gate.json"
"""The gate's verdict, in OUTPUT/gate."""
