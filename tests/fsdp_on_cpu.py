"""Run a script or module (``fsdp_on_cpu.py -m MODULE ARGS`` or ``fsdp_on_cpu.py SCRIPT ARGS``) with accelerate's FSDP
plugin on CPU processes.

accelerate 1.16 turns FSDP on only for accelerator devices: with ``ACCELERATE_USE_CPU=true`` the state is
``MULTI_CPU`` (plain DDP) whatever ``--use_fsdp`` says (``accelerate/state.py``, ``AcceleratorState.__init__``: the
FSDP branch is under ``distributed_type in [MULTI_GPU, ...]``). torch's FSDP2 (``fully_shard``) itself runs on CPU
tensors over gloo, so this shim makes the state FSDP when accelerate was given an FSDP plugin, and nothing else:
every prepare, gather, save and load that follows is accelerate's and torch's own code. Test-only.
"""

from __future__ import annotations

import faulthandler
import os
import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        # Every later AcceleratorState() copies PartialState's shared state over its own: keep the two alike.
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu  # type: ignore[method-assign]

if __name__ == "__main__":
    if os.environ.get("TRACEBACK_AFTER"):  # debugging a hang: every thread's stack on stderr after that many seconds
        faulthandler.dump_traceback_later(float(os.environ["TRACEBACK_AFTER"]), exit=True)
    if sys.argv[1] == "-m":
        sys.argv = [sys.argv[2], *sys.argv[3:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
