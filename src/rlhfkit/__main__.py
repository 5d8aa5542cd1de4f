"""``python -m rlhfkit ARGS``: the ``rlhfkit`` command (:func:`rlhfkit.cli.main`), for launchers that start a
module rather than a script: ``accelerate launch -m rlhfkit run PIPELINE.yaml``, ``torchrun -m rlhfkit sft ...``."""

import sys

from rlhfkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
