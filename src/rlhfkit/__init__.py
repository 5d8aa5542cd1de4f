"""rlhfkit: the whole RLHF pipeline, readable and fast, from one CPU to many GPUs.

Stages (each a typed config and a ``train``/``run`` function, wrapped by the CLI):

* :mod:`rlhfkit.sft` — supervised fine-tuning.

Building blocks: :mod:`rlhfkit.models` (loading), :mod:`rlhfkit.data` (formats),
:mod:`rlhfkit.loop` (the shared training loop), :mod:`rlhfkit.rollout` (generation).
"""

__version__ = "0.1.0"
