"""Feedback sources: who says which response is better.

Every source - the simulated annotator (:mod:`rlhfkit.feedback.simulated`), an
AI judge, or a human at a terminal or web page - produces the same label record,
:class:`rlhfkit.data.records.Comparison`, so the reward-model and DPO trainers
never need to know where a label came from.

:mod:`rlhfkit.feedback.scorers` holds the transparent score functions (sentiment,
length, banned words, the demo rubric) behind the simulated annotator; they have
the signature of user reward functions and can be loaded by name or as
``"module:function"`` with :func:`load_scorer`.
"""

from rlhfkit.feedback.scorers import DEMO_RUBRIC, Rubric, load_scorer
from rlhfkit.feedback.simulated import SimulatedAnnotator

__all__ = ["DEMO_RUBRIC", "Rubric", "SimulatedAnnotator", "load_scorer"]
