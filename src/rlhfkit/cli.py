"""Command-line interface: thin wrappers over the Python API.

rlhfkit sft CONFIG.yaml [key=value ...]     -> rlhfkit.sft.train(SFTConfig)
rlhfkit sample CONFIG.yaml [key=value ...]  -> rlhfkit.sample.run(SampleConfig)
rlhfkit label CONFIG.yaml [key=value ...]   -> rlhfkit.label.run(LabelConfig)
rlhfkit query CONFIG.yaml [key=value ...]   -> rlhfkit.active.select(QueryConfig)
rlhfkit reward CONFIG.yaml [key=value ...]  -> rlhfkit.reward.train(RewardConfig)
rlhfkit dpo CONFIG.yaml [key=value ...]     -> rlhfkit.dpo.train(DPOConfig)
rlhfkit kto CONFIG.yaml [key=value ...]     -> rlhfkit.kto.train(KTOConfig)
rlhfkit ilql CONFIG.yaml [key=value ...]    -> rlhfkit.ilql.train(ILQLConfig)
rlhfkit cai CONFIG.yaml [key=value ...]     -> rlhfkit.cai.critique_revise(CAIConfig)
rlhfkit cai-label CONFIG.yaml [k=v ...]     -> rlhfkit.cai_label.label_on_principles(CAILabelConfig)
rlhfkit ppo|grpo|rloo CONFIG.yaml [k=v ...] -> rlhfkit.rl.train(RLConfig / GRPOConfig / RLOOConfig)
rlhfkit a2c|nlpo|reinforce CONFIG.yaml [k=v ...] -> rlhfkit.rl.train(A2CConfig / NLPOConfig / ReinforceConfig)
rlhfkit chat MODEL [--prompt TEXT]          -> rlhfkit.generation.rollout.HFGenerator
                   [--ilql-beta B]          -> rlhfkit.ilql.ILQLGenerator (an ILQL output directory)
rlhfkit serve MODEL [--port P]              -> rlhfkit.serve.serve (OpenAI-compatible)
rlhfkit annotate serve|add-annotator|annotator|lead-token|status|export|terminal ...
                                            -> rlhfkit.feedback.web (browser) / feedback.terminal
rlhfkit eval CONFIG.yaml [key=value ...]    -> rlhfkit.evaluate.run(EvalConfig)
rlhfkit elo CONFIG.yaml [key=value ...]     -> rlhfkit.elo.run(EloConfig)
rlhfkit run PIPELINE.yaml [--from STAGE]    -> rlhfkit.pipeline.run(PipelineConfig)
rlhfkit demo [key=value ...] [--from STAGE] -> rlhfkit.pipeline.run(demo_config(...))
rlhfkit doctor RUN_DIR [--strict] [k=v ...] -> rlhfkit.doctor.run(DoctorConfig)
rlhfkit config STAGE                        -> print a stage's keys, defaults and docs

``python -m rlhfkit ...`` is the same command, for launchers that start a module:
``accelerate launch -m rlhfkit run PIPELINE.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] key=value ...`` -> (config path or None, overrides)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


# command -> (module, config class, function); modules are imported only when used.
STAGES = {
    "sft": ("sft", "SFTConfig", "train"),
    "sample": ("sample", "SampleConfig", "run"),
    "label": ("label", "LabelConfig", "run"),
    "query": ("active", "QueryConfig", "select"),
    "reward": ("reward", "RewardConfig", "train"),
    "dpo": ("dpo", "DPOConfig", "train"),
    "kto": ("kto", "KTOConfig", "train"),
    "ilql": ("ilql", "ILQLConfig", "train"),
    "cai": ("cai", "CAIConfig", "critique_revise"),
    "cai-label": ("cai_label", "CAILabelConfig", "label_on_principles"),
    "ppo": ("rl", "RLConfig", "train"),
    "grpo": ("rl", "GRPOConfig", "train"),
    "rloo": ("rl", "RLOOConfig", "train"),
    "a2c": ("rl", "A2CConfig", "train"),
    "nlpo": ("rl", "NLPOConfig", "train"),
    "reinforce": ("rl", "ReinforceConfig", "train"),
    "iterated-dpo": ("iterated", "IteratedDPOConfig", "run"),
    "eval": ("evaluate", "EvalConfig", "run"),
    "elo": ("elo", "EloConfig", "run"),
    "report": ("report", "ReportConfig", "run"),
    "run": ("pipeline", "PipelineConfig", "run"),
    "demo": ("pipeline", "PipelineConfig", "run"),
    "doctor": ("doctor", "DoctorConfig", "run"),
}

RL_STAGES = frozenset({"ppo", "grpo", "rloo", "reinforce", "a2c", "nlpo"})
"""Stage names an RL run's config.yaml may carry (its ``algorithm``); ``rlhfkit ppo|grpo|rloo|a2c|nlpo|reinforce`` read
any of them."""


def _stage(name: str):
    import importlib

    module_name, config_name, fn_name = STAGES[name]
    module = importlib.import_module(f"rlhfkit.{module_name}")
    return getattr(module, config_name), getattr(module, fn_name)


def _run_stage(name: str, args: list[str], from_stage: str | None = None) -> int:
    from rlhfkit.config import ConfigError, load_config, parse_overrides

    if name == "demo":
        from rlhfkit import pipeline

        path, overrides = _split_config_args(args)
        if path is not None:
            raise ConfigError(f"demo takes only key=value overrides, got '{path}'")
        pipeline.run(pipeline.demo_config(**parse_overrides(overrides)), from_stage=from_stage)
        return 0
    config_cls, fn = _stage(name)
    path, overrides = _split_config_args(args)
    # A run's saved config.yaml names its stage; an RL run names its algorithm, which any RL command reads.
    stages = RL_STAGES if name in RL_STAGES else {name}
    config = load_config(config_cls, path, overrides, stages=stages)
    if name == "run":
        fn(config, from_stage=from_stage)
    else:
        fn(config)
    return 0


def _doctor(ns: argparse.Namespace) -> int:
    """``rlhfkit doctor RUN_DIR [--strict] [key=value ...]``: print the findings; exit 0, or 1 with ``--strict``
    when one is a problem."""
    from rlhfkit import doctor
    from rlhfkit.config import load_config

    config = load_config(doctor.DoctorConfig, None, ns.args)
    config = dataclasses.replace(config, run_dir=ns.run_dir, strict=config.strict or ns.strict)
    findings = doctor.run(config)
    return 1 if config.strict and any(f.severity == "problem" for f in findings) else 0


def _chat(ns: argparse.Namespace) -> int:
    from rlhfkit.generation.rollout import GenerationOptions, HFGenerator
    from rlhfkit.modeling import models

    if ns.ilql_beta is not None:
        # An ILQL output directory, decoded with its heads: log pi + beta (min Q - V), top-k, the temperature.
        from rlhfkit.ilql import ILQLDecodeOptions, ILQLGenerator

        generator = ILQLGenerator.from_dir(ns.model)
        options = ILQLDecodeOptions(
            beta=ns.ilql_beta, top_k=ns.top_k, temperature=ns.temperature, max_new_tokens=ns.max_new_tokens
        )
    else:
        tokenizer = models.load_tokenizer(ns.model)
        model = models.load_causal_lm(ns.model)
        generator = HFGenerator(model, tokenizer, precision=ns.precision)
        options = GenerationOptions(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p)
    prompts = ns.prompt or []
    if not prompts:
        if sys.stdin.isatty():
            print("Type a prompt (empty line or Ctrl-D to quit).")
            while True:
                try:
                    line = input("> ").strip()
                except EOFError:
                    break
                if not line:
                    break
                print(generator.generate([line], options)[0].strip())
            return 0
        prompts = [line.strip() for line in sys.stdin if line.strip()]
    for prompt, reply in zip(prompts, generator.generate(prompts, options)):
        print(f"### prompt\n{prompt}\n### response\n{reply.strip()}\n")
    return 0


def _show_config(stage: str) -> int:
    from rlhfkit.config import field_docs

    config_cls, _ = _stage(stage)
    docs = field_docs(config_cls)
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        print(f"{f.name}: {default!r}\n    {docs.get(f.name, '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfkit", description="The RLHF pipeline: SFT, preferences, reward, RL, DPO.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("sft", "supervised fine-tuning"),
        ("sample", "sample responses to label (two per prompt by default)"),
        ("label", "label samples: simulated annotator, AI judge, or a human at the terminal"),
        ("query", "pick the pairs to label next: reward-ensemble disagreement, uncertainty, or random"),
        ("reward", "train a reward model on preference data"),
        ("dpo", "direct preference optimisation (DPO, IPO, SLiC hinge, SimPO)"),
        ("kto", "KTO on unpaired thumbs-up/down data (paired data converted)"),
        ("ilql", "ILQL: offline RL (Q, V and target-Q heads) from (prompt, response, reward) data"),
        ("cai", "Constitutional AI (SL-CAI): answer, critique and revise against a constitution -> SFT data"),
        ("cai-label", "Constitutional AI (RL-CAI): an AI judge compares sampled responses on principles -> soft labels"),
        ("ppo", "PPO with a KL penalty to the frozen reference"),
        ("grpo", "GRPO: group-normalised advantages, KL in the loss"),
        ("rloo", "RLOO: leave-one-out baseline, KL in the reward"),
        ("a2c", "A2C: advantage actor-critic, one unclipped pass per rollout, value loss and entropy bonus"),
        ("nlpo", "NLPO: PPO within the top-p tokens of a masking policy refreshed every few steps"),
        ("reinforce", "plain REINFORCE: discounted returns minus the batch mean, KL in the reward"),
        ("iterated-dpo", "rounds of sample -> label -> DPO (reference kept or refreshed)"),
        ("eval", "evaluate a policy against a baseline (win rate, gold score, KL, best-of-n, Elo)"),
        ("elo", "Elo / Bradley-Terry ratings of models from labelled comparisons"),
        ("report", "write report.html for a pipeline run directory (run_dir=DIR)"),
        ("run", "the pipeline: sft -> sample -> label -> reward -> rl/dpo -> eval -> report"),
        ("demo", "the end-to-end demo pipeline on the embedded SmolLM2-135M (README's main command)"),
    ]:
        p = sub.add_parser(
            name,
            help=help_text,
            description=f"{help_text}. Arguments: [CONFIG.yaml] [key=value ...]; `rlhfkit config {name}` lists the keys.",
        )
        p.add_argument("args", nargs="*", metavar="CONFIG.yaml|key=value")
        if name in ("run", "demo"):
            p.add_argument("--from", dest="from_stage", default=None, help="rerun from this stage on")
    help_text = "read a run's metrics.jsonl and name, in plain words, what went wrong and what to try"
    p = sub.add_parser(
        "doctor",
        help=help_text,
        description=f"{help_text}. RUN_DIR: a training run's output directory, or a pipeline run directory (each "
        "policy stage's). Thresholds as key=value; `rlhfkit config doctor` lists them.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("args", nargs="*", metavar="key=value")
    p.add_argument("--strict", action="store_true", help="exit 1 when a finding is a problem")
    p = sub.add_parser("chat", help="generate from a model (smoke check)")
    p.add_argument("model", help="model spec: smollm2-135m, tiny, a .gguf file or a model directory")
    p.add_argument("--prompt", action="append", help="prompt (repeatable); otherwise read stdin")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "fp16"])
    p.add_argument(
        "--ilql-beta",
        type=float,
        default=None,
        help="decode an `rlhfkit ilql` output directory with its heads: logits + beta (Q - V) (0: its plain LM)",
    )
    p.add_argument("--top-k", type=int, default=20, help="with --ilql-beta: keep the k best perturbed logits (0: all)")
    sub.add_parser(
        "annotate",
        help="label by hand: web app (serve, add-annotator, annotator, lead-token, status, export) or terminal",
        add_help=False,
    )
    sub.add_parser("serve", help="OpenAI-compatible chat server for a model (rlhfkit serve MODEL --port P)", add_help=False)
    p = sub.add_parser("config", help="list a stage's config keys with defaults and docs")
    p.add_argument("stage", choices=sorted(STAGES))
    return parser


def describe_os_error(error: OSError) -> str:
    """``"No space left on device: FILE"``: the OS's reason and the file(s) it names (none for a failed write(2))."""
    text = error.strerror or str(error) or type(error).__name__
    if error.filename is not None:
        text += f": {error.filename}"
        if error.filename2 is not None:
            text += f" -> {error.filename2}"
    return text


def _close_progress_bars() -> None:
    """Finish the progress bars a failed stage left open (its final state and a newline), so that the error is
    printed on a line of its own, the last one, not glued to a half-drawn bar."""
    tqdm = sys.modules.get("tqdm.std")
    bars = getattr(getattr(tqdm, "tqdm", None), "_instances", None) or ()
    for bar in list(bars):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot redraw must not hide the error
            pass


def _leave_process_group() -> None:
    """After a command that succeeded under a launch (``accelerate launch``, ``torchrun``): every process waits
    for the others, then destroys the process groups while the interpreter is still whole. Left to the
    interpreter's exit, gloo's threads can abort a process that has finished its work ("terminate called without
    an active exception", SIGABRT; pytorch/pytorch#190489 and #179291): seen twice in CI on the two-process
    pipeline test. Not after a failure: a process that stopped early would leave the others waiting here
    (torchtitan#1342 destroys only on success for that reason)."""
    dist = sys.modules.get("torch.distributed")  # a launch imported it; a command alone need not
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _error(message: str) -> None:
    _close_progress_bars()
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from rlhfkit.config import ConfigError
    from rlhfkit.data.io import DataError
    from rlhfkit.modeling.models import ModelLoadError
    from rlhfkit.pipeline import StageError
    from rlhfkit.training.loop import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # its own parser: rlhfkit serve MODEL [--host --port --backend]
        from rlhfkit.serve import main_serve

        return main_serve(argv[1:])
    if argv[:1] == ["annotate"]:  # its own parser: rlhfkit annotate serve|add-annotator|...|terminal
        from rlhfkit.feedback.web.cli import main as main_annotate

        return main_annotate(argv[1:])
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "chat":
            return _chat(ns)
        if ns.command == "config":
            return _show_config(ns.stage)
        if ns.command == "doctor":
            return _doctor(ns)
        code = _run_stage(ns.command, ns.args, getattr(ns, "from_stage", None))
        if code == 0:
            _leave_process_group()
        return code
    except (ConfigError, DataError, ModelLoadError, CheckpointError) as e:
        _error(f"rlhfkit {ns.command}: error: {e}")
        return 2
    except OSError as e:  # the machine's, not the program's: a full disk, a missing or unwritable file
        _error(f"rlhfkit {ns.command}: error: {describe_os_error(e)}")
        return 1
    except StageError as e:
        _error(f"rlhfkit {ns.command}: {e}")
        print(
            "rlhfkit: outputs of the earlier stages are intact, and so is the failed stage's output from its last "
            "successful run, if any; fix the problem and run again to resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        _error(f"rlhfkit {ns.command}: interrupted; completed checkpoints are kept")
        return 130


if __name__ == "__main__":
    sys.exit(main())
