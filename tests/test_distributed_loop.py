"""The training loop under accelerate's distributed engines (issue 21).

- DeepSpeed: :func:`rlhfkit.training.loop.fill_deepspeed_config` on hand-worked configs, and :func:`loop.prepare`
  filling the plugin's config before accelerate reads it (a recording stand-in for the Accelerator: DeepSpeed itself
  is not installed here).
- FSDP version 1 without ``use_orig_params`` is refused (the optimizer would hold stale parameters).
- :meth:`Checkpointer.save` waits for every process between ``save_state`` and the rename.
- Two gloo CPU processes with gradient accumulation, one checkpoint and a resume from it equal one process.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from transformers import AutoModelForCausalLM

from rlhfkit.config import ConfigError, to_dict
from rlhfkit.sft import train
from rlhfkit.training import loop
from rlhfkit.training.optim import build_optimizer, build_scheduler
from tests.helpers import assert_same_weights, launch_two_cpu_processes, saved_weights, train_entries

GATHER = "stage3_gather_16bit_weights_on_model_save"


# ----------------------------------------------------------------------------- fill_deepspeed_config, by hand


def test_fills_every_auto_key_and_leaves_zero2_alone():
    # What `accelerate launch --use_deepspeed --zero_stage 2` builds without a DeepSpeed JSON
    # (DeepSpeedPlugin.__post_init__), trimmed to the keys that matter.
    config = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 2, GATHER: False},
    }
    before = copy.deepcopy(config)
    filled = loop.fill_deepspeed_config(config, micro_batch_size=4, grad_accum=2, num_processes=2, max_grad_norm=0.5)
    assert filled == {
        "train_batch_size": 16,  # 4 rows x 2 micro-batches x 2 processes
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 2, GATHER: False},  # ZeRO-2 keeps whole weights: nothing to gather
    }
    assert config == before  # a copy; the input is not changed


def test_fills_missing_keys_and_zero3_gather_and_no_clipping():
    filled = loop.fill_deepspeed_config(
        {"zero_optimization": {"stage": 3}}, micro_batch_size=3, grad_accum=1, num_processes=4, max_grad_norm=0
    )
    assert filled == {
        "train_batch_size": 12,  # 3 x 1 x 4
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # max_grad_norm 0: DeepSpeed does not clip (its "auto" would be 1.0)
        "zero_optimization": {"stage": 3, GATHER: True},
    }


def test_keeps_explicit_values_that_agree():
    config = {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1,  # an int in the JSON: the same as max_grad_norm 1.0
        "zero_optimization": {"stage": 3, GATHER: True, "offload_param": {"device": "cpu"}},
        "bf16": {"enabled": "auto"},  # not rlhfkit's to fill: accelerate's set_mixed_precision does
    }
    filled = loop.fill_deepspeed_config(config, micro_batch_size=4, grad_accum=2, num_processes=2, max_grad_norm=1.0)
    assert filled == config


def test_zero3_gather_auto_becomes_true():
    filled = loop.fill_deepspeed_config(
        {"zero_optimization": {"stage": 3, GATHER: "auto"}}, micro_batch_size=1, grad_accum=1, num_processes=1, max_grad_norm=1.0
    )
    assert filled["zero_optimization"][GATHER] is True


def test_conflicting_explicit_values_are_refused_naming_each_key():
    config = {
        "train_batch_size": 32,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 1,  # what accelerate writes when a DeepSpeed JSON lacks the key
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, GATHER: False},
    }
    with pytest.raises(ConfigError) as info:
        loop.fill_deepspeed_config(config, micro_batch_size=4, grad_accum=2, num_processes=2, max_grad_norm=0.0)
    message = str(info.value)
    assert "train_batch_size is 32, the run needs 16 (batch_size x grad_accum x processes = 4 x 2 x 2)" in message
    assert "gradient_accumulation_steps is 1, the run needs 2 (grad_accum)" in message
    assert "gradient_clipping is 1.0, the run needs 0.0 (max_grad_norm)" in message
    assert f"zero_optimization.{GATHER} is False, the run needs True" in message
    assert "train_micro_batch_size_per_gpu" not in message  # "auto": filled, no conflict
    assert '"auto"' in message and "--zero3_save_16bit_model true" in message


# ----------------------------------------------------------------------------- prepare: the glue


class RecordingAccelerator:
    """What :func:`loop.prepare` and :meth:`loop.Checkpointer.save` use of an Accelerator, recording the calls."""

    def __init__(self, *, distributed_type=DistributedType.NO, deepspeed_plugin=None, fsdp_plugin=None, grad_accum=1):
        self.distributed_type = distributed_type
        self.is_fsdp2 = fsdp_plugin is not None and fsdp_plugin.fsdp_version == 2
        self.state = SimpleNamespace(deepspeed_plugin=deepspeed_plugin, fsdp_plugin=fsdp_plugin)
        self.gradient_accumulation_steps = grad_accum
        self.num_processes = 2
        self.is_main_process = True
        self.device = torch.device("cpu")
        self.calls: list[tuple] = []
        self.deepspeed_config_at_prepare: dict | None = None

    def prepare(self, model, optimizer):
        plugin = self.state.deepspeed_plugin
        if plugin is not None:  # what accelerate's _prepare_deepspeed reads first
            self.deepspeed_config_at_prepare = copy.deepcopy(plugin.deepspeed_config)
            if plugin.is_auto("train_micro_batch_size_per_gpu"):
                raise ValueError("When using DeepSpeed, `accelerate.prepare()` requires you to pass at least one ...")
        self.calls.append(("prepare",))
        return model, optimizer

    def unwrap_model(self, model, keep_fp32_wrapper=True):
        return model

    # Checkpointer.save
    def wait_for_everyone(self):
        self.calls.append(("wait_for_everyone",))

    def save_state(self, output_dir):
        (Path(output_dir) / "random_states_0.pkl").write_bytes(b"rng")
        self.calls.append(("save_state",))


def tiny_model_and_optimizer():
    model = torch.nn.Linear(3, 2)
    return model, build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)


def test_prepare_fills_the_deepspeed_plugins_config_before_accelerate_reads_it():
    plugin = DeepSpeedPlugin(zero_stage=2)  # no JSON: every batch key "auto"
    acc = RecordingAccelerator(distributed_type=DistributedType.DEEPSPEED, deepspeed_plugin=plugin, grad_accum=2)
    loop.prepare(acc, *tiny_model_and_optimizer(), micro_batch_size=4, max_grad_norm=0.5)
    seen = acc.deepspeed_config_at_prepare
    assert seen is not None
    assert (seen["train_micro_batch_size_per_gpu"], seen["train_batch_size"]) == (4, 16)
    assert (seen["gradient_accumulation_steps"], seen["gradient_clipping"]) == (2, 0.5)
    # In place: accelerate reads the values through the plugin's HfDeepSpeedConfig.
    assert plugin.get_value("train_batch_size") == 16 and not plugin.is_auto("gradient_clipping")


def test_prepare_under_deepspeed_zero3_without_the_gather_is_refused_before_training():
    # accelerate's default without a JSON is zero3_save_16bit_model False; the final save would then fail.
    acc = RecordingAccelerator(distributed_type=DistributedType.DEEPSPEED, deepspeed_plugin=DeepSpeedPlugin(zero_stage=3))
    with pytest.raises(ConfigError, match="--zero3_save_16bit_model true"):
        loop.prepare(acc, *tiny_model_and_optimizer(), micro_batch_size=1, max_grad_norm=1.0)
    assert acc.calls == []
    plugin = DeepSpeedPlugin(zero_stage=3, zero3_save_16bit_model=True)
    acc = RecordingAccelerator(distributed_type=DistributedType.DEEPSPEED, deepspeed_plugin=plugin)
    loop.prepare(acc, *tiny_model_and_optimizer(), micro_batch_size=1, max_grad_norm=1.0)
    assert acc.calls == [("prepare",)]


def test_prepare_under_deepspeed_leaves_the_zero_optimizer_unprimed():
    # DeepSpeed's ZeRO optimizer steps on gradients a backward reduced into its buffers; a step without one (as
    # prime_state's) fails: KeyError in DeepSpeedZeroOptimizer.scaled_global_norm, seen in a 2-process ZeRO-2 run.
    class ZeroOptimizer:
        param_groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}]
        state: dict = {}

        def step(self):
            raise KeyError(0)

    acc = RecordingAccelerator(distributed_type=DistributedType.DEEPSPEED, deepspeed_plugin=DeepSpeedPlugin(zero_stage=2))
    acc.prepare = lambda model, optimizer: (model, SimpleNamespace(optimizer=ZeroOptimizer()))  # type: ignore[method-assign]
    loop.prepare(acc, *tiny_model_and_optimizer(), micro_batch_size=1, max_grad_norm=1.0)


def test_prepare_under_deepspeed_needs_the_batch_numbers():
    acc = RecordingAccelerator(distributed_type=DistributedType.DEEPSPEED, deepspeed_plugin=DeepSpeedPlugin(zero_stage=2))
    with pytest.raises(TypeError, match="micro_batch_size and max_grad_norm"):
        loop.prepare(acc, *tiny_model_and_optimizer())


# ----------------------------------------------------------------------------- FSDP1 without use_orig_params


def test_fsdp1_without_use_orig_params_is_refused():
    acc = RecordingAccelerator(
        distributed_type=DistributedType.FSDP, fsdp_plugin=FullyShardedDataParallelPlugin(use_orig_params=False)
    )
    with pytest.raises(ConfigError, match="fsdp_use_orig_params: true"):
        loop.prepare(acc, *tiny_model_and_optimizer())
    assert acc.calls == []  # refused before accelerate wrapped anything


@pytest.mark.parametrize("plugin", [dict(use_orig_params=True), dict(fsdp_version=2)], ids=["orig_params", "fsdp2"])
def test_fsdp_keeping_the_parameters_is_prepared(plugin):
    acc = RecordingAccelerator(distributed_type=DistributedType.FSDP, fsdp_plugin=FullyShardedDataParallelPlugin(**plugin))
    loop.prepare(acc, *tiny_model_and_optimizer())
    assert acc.calls == [("prepare",)]


def test_lora_under_fsdp_is_refused_before_wrapping_and_under_ddp_is_prepared():
    from peft import LoraConfig, get_peft_model

    model, optimizer = tiny_model_and_optimizer()  # a Linear: peft adapts it by its name in the parent module
    lora = get_peft_model(torch.nn.Sequential(model), LoraConfig(r=2, target_modules=["0"]))
    acc = RecordingAccelerator(distributed_type=DistributedType.FSDP, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    with pytest.raises(ConfigError, match="LoRA"):
        loop.prepare(acc, lora, optimizer)
    with pytest.raises(ConfigError, match="LoRA"):  # an RL ActorCritic whose policy has adapters
        loop.prepare(acc, SimpleNamespace(policy=lora, critic=None), optimizer)
    assert acc.calls == []
    ddp = RecordingAccelerator(distributed_type=DistributedType.MULTI_CPU)
    loop.prepare(ddp, lora, optimizer)
    assert ddp.calls == [("prepare",)]


# ----------------------------------------------------------------------------- Checkpointer.save's barriers


def test_checkpoint_save_waits_for_every_process_around_save_state(tmp_path):
    acc = RecordingAccelerator()
    model, optimizer = tiny_model_and_optimizer()
    scheduler = build_scheduler(optimizer, warmup_steps=0, total_steps=4, schedule="constant", min_lr_ratio=0.0)
    checkpointer = loop.Checkpointer(acc, tmp_path, keep=2, scheduler=scheduler, config=loop.TrainOptions())
    tmp, final = tmp_path / "checkpoints" / ".tmp-step-0000003", tmp_path / "checkpoints" / "step-0000003"

    def wait_for_everyone():
        acc.calls.append(("wait_for_everyone", "tmp" if tmp.exists() else "final" if final.exists() else "none"))

    acc.wait_for_everyone = wait_for_everyone  # type: ignore[method-assign]
    assert checkpointer.save(3, {"step": 3}) == final
    i = acc.calls.index(("save_state",))
    # Before: a barrier once the main process has made tmp (the others write into it). After: a barrier while tmp
    # is still there, so the main process renames it only once every process has written its files.
    assert acc.calls[i - 1] == ("wait_for_everyone", "tmp")
    assert acc.calls[i + 1] == ("wait_for_everyone", "tmp")
    assert acc.calls[-1] == ("wait_for_everyone", "final")
    assert (final / "random_states_0.pkl").is_file()


# ----------------------------------------------------------------------------- two processes, a checkpoint, a resume


def launch_two_processes(config, timeout: float = 900, fsdp: bool = False) -> subprocess.CompletedProcess:
    """``rlhfkit sft`` on ``config`` in two gloo CPU processes (:func:`tests.helpers.launch_two_cpu_processes`)."""
    config_file = Path(config.output_dir).with_suffix(".yaml")
    config_file.write_text(yaml.safe_dump(to_dict(config)), encoding="utf-8")
    proc = launch_two_cpu_processes(["-m", "rlhfkit.cli", "sft", str(config_file)], timeout=timeout, fsdp=fsdp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_with_accumulation_checkpoint_and_resume_equal_one_process(varied_file, make_config, fsdp):
    # 16 examples; two processes x batch 2 x grad_accum 2 = a global batch of 8, two steps an epoch.
    common = dict(data=str(varied_file), max_steps=4, lr=1e-3, warmup_ratio=0.0, seed=7, grad_accum=2, save_every=2)
    two = make_config("two", batch_size=2, **common)
    launch_two_processes(two, fsdp=fsdp)
    checkpoint = Path(two.output_dir) / "checkpoints" / "step-0000002"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    if fsdp:  # accelerate's FSDP checkpoint: the model state apart from the optimizer's
        assert (checkpoint / "pytorch_model_fsdp.bin").is_file()

    # The same run killed after its step-2 checkpoint: resumed from it, in another output_dir.
    resumed = make_config("resumed", batch_size=2, resume=str(checkpoint), **common)
    proc = launch_two_processes(resumed, fsdp=fsdp)
    assert proc.stdout.count(f"resumed from {checkpoint} at step 2") == 1, proc.stdout[-2000:]

    one = make_config("one", batch_size=4, **common)
    train(one)

    one_log, two_log, resumed_log = (train_entries(c.output_dir) for c in (one, two, resumed))
    assert [r["step"] for r in two_log] == [1, 2, 3, 4]
    assert [r["step"] for r in resumed_log] == [3, 4]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in two_log] == pytest.approx([r[key] for r in one_log], rel=1e-4), key
        assert [r[key] for r in resumed_log] == pytest.approx([r[key] for r in two_log[2:]], rel=1e-6), key
    assert [r["tokens_seen"] for r in two_log] == [r["tokens_seen"] for r in one_log]
    assert [r["tokens_seen"] for r in resumed_log] == [r["tokens_seen"] for r in two_log[2:]]
    assert_same_weights(saved_weights(two.output_dir), saved_weights(one.output_dir), atol=1e-5)
    assert_same_weights(saved_weights(resumed.output_dir), saved_weights(two.output_dir), atol=1e-6)
    loaded = AutoModelForCausalLM.from_pretrained(two.output_dir)  # the gathered save is a whole model
    assert_same_weights(
        {k: v for k, v in loaded.state_dict().items() if k in saved_weights(one.output_dir)},
        saved_weights(one.output_dir),
        atol=1e-5,
    )
