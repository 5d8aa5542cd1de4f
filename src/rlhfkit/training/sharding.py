"""Whole parameters for the forwards an RL step runs outside a training forward, on a sharded model.

Generation, the frozen reference's forward when it is the policy itself (LoRA: the base with the adapters
off), the frontier probe and the vLLM weight push call the unwrapped policy (``acc.unwrap_model(model).policy``),
not the prepared model. Under DDP and DeepSpeed ZeRO-1/2 that is every weight. Under FSDP it is not:

* **FSDP2** (``fully_shard``, accelerate's ``fsdp_version: 2``): the root unit (the ``ActorCritic``: embeddings,
  final norm, LM head) keeps its parameters as sharded DTensors until its own forward runs, so a call through
  ``.policy`` fails (``aten.embedding got mixed torch.Tensor and DTensor``); and every decoder-layer unit
  all-gathers in each forward, a number of collectives that depends on the data (decode steps, the shared-prefix
  forwards), which would hang ranks that generate different lengths. :func:`whole_parameters` unshards every unit
  once (collective, the same on every rank) and keeps them whole until the block ends: the forwards inside run
  no collective, so ranks may run different forwards, or only one rank may (the probe). This is what
  ``FSDPModule.set_reshard_after_forward(False)`` is documented for ("for running evals", torch
  ``_fully_shard.py``); TRL does the FSDP1 counterpart with ``summon_full_params`` around generation
  (``trl/trainer/grpo_trainer.py``, ``trl/distributed.py``).
* **FSDP1** and **DeepSpeed ZeRO-3** are refused for RL (:func:`check_rl_sharding`): neither runs on this project's
  CPU test machine, so their gather (TRL: ``summon_full_params(recurse=False)``; ZeRO-3:
  ``deepspeed.zero.GatheredParameters`` with the partition hooks removed, ``trl/models/utils.py``) could not be
  tested here. SFT, reward and DPO (``training.loop.fit``) run under both.

Training forwards (the PPO loss, PPO-ptx) always go through the prepared model, whose hooks shard and reduce.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rlhfkit.config import ConfigError


def is_sharded(acc) -> bool:
    """Whether a process's parameters may be shards (FSDP; DeepSpeed, whose ZeRO-3 does): then a state dict must be
    gathered by every process (``Accelerator.get_state_dict``)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def is_fsdp2(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP and bool(getattr(acc, "is_fsdp2", False))


def check_rl_sharding(acc) -> None:
    """Refuse the sharded set-ups online RL has no tested gather for (see the module docstring)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP and not is_fsdp2(acc):
        raise ConfigError(
            "online RL under FSDP1 is not supported: generation needs the whole policy, and only FSDP2's gather is "
            "tested; use fsdp_version: 2 in the accelerate config (`accelerate launch --fsdp_version 2`)"
        )
    if acc.distributed_type == DistributedType.DEEPSPEED:
        zero_stage = acc.state.deepspeed_plugin.zero_stage
        if zero_stage == 3:
            raise ConfigError(
                "online RL under DeepSpeed ZeRO-3 is not supported: generation and the reference need the whole "
                "policy and no ZeRO-3 gather has been tested; use ZeRO-2, FSDP2 (fsdp_version: 2), or DDP with LoRA"
            )


@contextmanager
def whole_parameters(acc, model) -> Iterator:
    """``acc.unwrap_model(model)`` with every parameter whole on this process until the block ends.

    Every process must enter and leave the block together (FSDP2: the unshard and reshard are collectives);
    inside it, forwards run without collectives. No-op where the parameters are whole already (one process,
    DDP, ZeRO-1/2). Not for training: gradients of the whole parameters would not reach the shards.
    """
    unwrapped = acc.unwrap_model(model)
    if not is_fsdp2(acc):
        yield unwrapped
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in unwrapped.modules() if isinstance(m, FSDPModule)]
    # The root unit must be the first to initialise: a decoder layer's forward would otherwise make itself the
    # root (torch FSDPState._lazy_init: "the 1st state to run forward"), and the next training step would fail.
    unwrapped._get_fsdp_state()._lazy_init()
    # set_reshard_after_forward(False) also clears the state's automatic choice: both are put back afterwards.
    saved = [
        (
            u._get_fsdp_state()._auto_reshard_after_forward,
            [g.post_forward_mesh_info for g in u._get_fsdp_state()._fsdp_param_groups],
        )
        for u in units
    ]
    try:
        for u in units:
            u.set_reshard_after_forward(False, recurse=False)
            u.unshard()
        yield unwrapped
    finally:
        for u, (auto, mesh_infos) in zip(units, saved, strict=True):
            u.reshard()
            state = u._get_fsdp_state()
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, mesh_infos, strict=True):
                group.post_forward_mesh_info = info
