"""rlhfkit: the whole RLHF pipeline, readable and fast, from one CPU to many GPUs.

Stages (each a typed config and a ``train``/``run`` function, wrapped by the CLI):

* :mod:`rlhfkit.sft` -- supervised fine-tuning;
* :mod:`rlhfkit.sample` and :mod:`rlhfkit.label` -- responses to compare, and preferences on them
  (simulated annotator, AI judge, terminal or web annotation);
* :mod:`rlhfkit.reward` -- the reward model;
* :mod:`rlhfkit.rl` -- PPO, GRPO, RLOO, REINFORCE against a reward;
* :mod:`rlhfkit.dpo` -- DPO and its relatives (IPO, hinge, SimPO); :mod:`rlhfkit.iterated` -- rounds of it;
* :mod:`rlhfkit.evaluate` -- win rates, gold scores, KL and best-of-n, with intervals;
* :mod:`rlhfkit.pipeline` -- all of them in order, and :mod:`rlhfkit.report` -- the HTML report.

Building blocks: :mod:`rlhfkit.losses` (the math), :mod:`rlhfkit.modeling.models` (loading and saving),
:mod:`rlhfkit.data` (formats), :mod:`rlhfkit.training.loop` (the shared training loop), :mod:`rlhfkit.generation.rollout`
(generation).
"""

__version__ = "0.1.0"

from rlhfkit import _moved

_moved.install()  # old paths of modules that moved into folders (rlhfkit.models, rlhfkit.rollout, ...)
