"""Durable checkpoints and model saves: fsync order, fallback past a torn checkpoint, no pickled
scheduler, a final save whose completion marker comes last, and iterated DPO trusting only that marker.

Runs are the tiny model in fp32 (the ``make_config`` fixture of ``conftest.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit import iterated
from rlhfkit.modeling import models
from rlhfkit.sft import train
from rlhfkit.training import loop
from tests.helpers import saved_weights, train_entries


class RunsCode:
    """Unpickling this calls ``os.mkdir(path)``: what a hostile checkpoint could do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def fast(qa_file, **fields) -> dict:
    return dict(data=str(qa_file), batch_size=4, lr_schedule="constant", warmup_ratio=0.0, **fields)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_fsynced_before_its_rename_and_the_parent_after(qa_file, make_config, monkeypatch):
    events: list[tuple[str, str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        real_rename(src, dst)

    def replace(src, dst):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    config = make_config("run", **fast(qa_file, max_steps=1, save_every=1))
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        patch.setattr(os, "rename", rename)
        patch.setattr(os, "replace", replace)
        train(config)
    checkpoint = Path(os.path.realpath(config.output_dir)) / "checkpoints" / "step-0000001"
    [at] = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(checkpoint)]
    tmp = Path(events[at][1])
    synced_before = {path for kind, path, _ in events[:at] if kind == "fsync"}
    inside = {str(tmp / p.relative_to(checkpoint)) for p in checkpoint.rglob("*")}
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= {Path(p).name for p in inside}
    missing = sorted((inside | {str(tmp)}) - synced_before)
    assert not missing, f"not fsynced before the rename: {missing}"
    synced_after = {path for kind, path, _ in events[at + 1 :] if kind == "fsync"}
    assert str(checkpoint.parent) in synced_after


def test_resume_falls_back_past_a_truncated_checkpoint(qa_file, make_config, capsys):
    common = fast(qa_file, save_every=2, keep_checkpoints=2)
    config = make_config("run", max_steps=4, **common)
    train(config)
    first = train_entries(config.output_dir)
    checkpoints = Path(config.output_dir) / "checkpoints"
    # What a power loss after an unsynced write leaves: the file's name, none of its bytes.
    (checkpoints / "step-0000004" / "model.safetensors").write_bytes(b"")
    capsys.readouterr()

    result = train(make_config("run", max_steps=6, **common))
    printed = capsys.readouterr().out
    assert f"checkpoint {checkpoints / 'step-0000004'} cannot be loaded" in printed
    assert "model.safetensors" in printed  # why
    assert f"resumed from {checkpoints / 'step-0000002'} at step 2" in printed
    assert result.state.step == 6
    entries = train_entries(config.output_dir)
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5, 6]
    # Steps 3 and 4 were redone from the step-2 checkpoint, exactly as the first time.
    assert [e["loss"] for e in entries[:4]] == pytest.approx([e["loss"] for e in first], rel=1e-6)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000004", "step-0000006"]


def test_no_checkpoint_loadable_is_an_error_naming_each(qa_file, make_config):
    common = fast(qa_file, save_every=1, keep_checkpoints=2)
    config = make_config("run", max_steps=2, **common)
    train(config)
    checkpoints = Path(config.output_dir) / "checkpoints"
    for name in ("step-0000001", "step-0000002"):
        (checkpoints / name / "optimizer.bin").write_bytes(b"")
    with pytest.raises(loop.CheckpointError) as info:
        train(make_config("run", max_steps=3, **common))
    message = str(info.value)
    assert "step-0000001" in message and "step-0000002" in message and "optimizer.bin" in message
    assert "resume=never" in message


def test_checkpoint_holds_no_pickled_scheduler_and_none_is_unpickled(qa_file, make_config, tmp_path):
    config = make_config("run", **fast(qa_file, max_steps=2, save_every=2))
    train(config)
    checkpoint = Path(config.output_dir) / "checkpoints" / "step-0000002"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert not [n for n in names if n.startswith(("custom_checkpoint", "scheduler")) and not n.endswith(".json")], names
    scheduler = json.loads((checkpoint / loop.SCHEDULER_FILE).read_text())
    assert scheduler["last_epoch"] == 2
    assert scheduler["base_lrs"] and all(lr == config.lr for lr in scheduler["base_lrs"])

    # A checkpoint from elsewhere carrying accelerate's custom-state pickle: refused unread.
    sentinel = tmp_path / "code-ran"
    torch.save({"state": RunsCode(sentinel)}, checkpoint / "custom_checkpoint_0.pkl")
    with pytest.raises(loop.CheckpointError, match="custom"):
        train(make_config("run", **fast(qa_file, max_steps=3, save_every=2)))
    assert not sentinel.exists()


# ----------------------------------------------------------------------------- final model saves


def test_save_pretrained_removes_stale_shards_and_writes_the_marker_last(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    stale = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
    ]
    for name in stale:
        (out / name).write_text("from an earlier, sharded save")
    (out / "metrics.jsonl").write_text("{}\n")  # not the save's own: kept
    moved: list[str] = []
    real_replace = os.replace

    def replace(src, dst):
        moved.append(Path(dst).name)
        real_replace(src, dst)

    model = models.build_tiny()
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace)
        models.save_pretrained(model, tokenizer, out)
    names = sorted(p.name for p in out.iterdir())
    assert not set(stale) & set(names), names
    assert "metrics.jsonl" in names and "model.safetensors" in names
    assert not [n for n in names if n.startswith(".")], names  # no temp directory left
    assert moved[-1] == models.COMPLETE_MARKER, moved
    assert "model.safetensors" in moved[:-1]
    assert models.is_complete_save(out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.state_dict().items())


def test_a_save_interrupted_before_the_marker_is_incomplete(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "model"
    models.save_pretrained(models.build_tiny(), tokenizer, out)
    assert models.is_complete_save(out)
    real_replace = os.replace

    def crash_at_the_weights(src, dst):
        if Path(dst) == out / "model.safetensors":
            raise OSError("simulated crash while moving the new weights into place")
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash_at_the_weights)
        with pytest.raises(OSError, match="simulated crash"):
            models.save_pretrained(models.build_tiny(seed=1), tokenizer, out)
    # The old marker must not vouch for a directory that is now half old, half new.
    assert not models.is_complete_save(out)
    assert not models.is_complete_save(tmp_path / "never-written")
    # A later save completes it again, with the new weights.
    models.save_pretrained(models.build_tiny(seed=1), tokenizer, out)
    assert models.is_complete_save(out)
    new = models.build_tiny(seed=1).state_dict()
    assert all(torch.equal(t, new[k]) for k, t in saved_weights(out).items())


def test_iterated_dpo_redoes_a_round_whose_model_has_no_marker(tmp_path, monkeypatch, tokenizer):
    trained: list[str] = []

    def fake_dpo(config):
        trained.append(config.output_dir)
        models.save_pretrained(models.build_tiny(), tokenizer, config.output_dir)

    monkeypatch.setattr(iterated.sample, "run", lambda config: None)
    monkeypatch.setattr(iterated.label, "run", lambda config: None)
    monkeypatch.setattr(iterated.dpo, "train", fake_dpo)
    config = iterated.IteratedDPOConfig(rounds=1, prompts_per_round=2, output_dir=str(tmp_path / "it"))
    model_dir = tmp_path / "it" / "round-0" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")  # a save torn after its first file
    assert iterated.run(config) == [model_dir]
    assert trained == [str(model_dir)]
    assert iterated.run(config) == [model_dir]  # complete now: skipped
    assert trained == [str(model_dir)]


# ----------------------------------------------------------------------------- full disk, kills, orphans


def _metrics_without_timings(output_dir) -> list[dict]:
    """``metrics.jsonl`` as written, less the wall-clock fields (which differ between any two runs)."""
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in r.items() if k != "time" and not k.endswith("_per_s")} for r in records]


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs, nothing catches it."""


def test_a_run_killed_in_its_final_save_logs_the_final_eval_once(qa_file, make_config, monkeypatch):
    common = fast(qa_file, max_steps=4, save_every=2, eval_fraction=0.25, eval_every=2)
    train(make_config("uninterrupted", **common))
    want = _metrics_without_timings(make_config("uninterrupted").output_dir)
    assert [r["step"] for r in want if "eval_loss" in r] == [2, 4]

    def killed(*args, **kwargs):
        raise Killed()

    config = make_config("killed", **common)
    with monkeypatch.context() as patch:  # killed after the final eval, during the final save
        patch.setattr(models, "save_pretrained", killed)
        with pytest.raises(Killed):
            train(config)
    assert [r["step"] for r in _metrics_without_timings(config.output_dir) if "eval_loss" in r] == [2, 4]
    result = train(config)  # resumes from the step-4 checkpoint: no step left, evaluates and saves
    assert result.state.step == 4
    got = _metrics_without_timings(config.output_dir)
    assert [r["step"] for r in got if "eval_loss" in r] == [2, 4], got  # once, not [2, 4, 4]
    assert got == want  # as the uninterrupted run wrote it (a resumed run is exact)
    assert models.is_complete_save(config.output_dir)


def _fail_writing(patch, name: str, error: BaseException, *, inside: str = ".tmp-step-0000004") -> None:
    """Make accelerate's checkpoint writer fail on file ``name`` of the temp checkpoint ``inside``, after part of it
    reached the disk (what a full disk leaves)."""
    import accelerate.checkpointing

    real = accelerate.checkpointing.save

    def save(obj, f, *args, **kwargs):
        if Path(f).name == name and Path(f).parent.name == inside:
            Path(f).write_bytes(b"\0" * 100)
            raise error
        return real(obj, f, *args, **kwargs)

    patch.setattr(accelerate.checkpointing, "save", save)


def _checkpoint_write_errors():
    from safetensors import SafetensorError

    return [
        ("model.safetensors", SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
        ("optimizer.bin", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5120 vs 5012")),
        ("optimizer.bin", OSError(28, "No space left on device")),
    ]


@pytest.mark.parametrize("name,error", _checkpoint_write_errors(), ids=["safetensors", "torch-writer", "oserror"])
def test_a_checkpoint_write_that_fails_is_a_checkpoint_error_and_keeps_the_previous(
    qa_file, make_config, monkeypatch, capsys, name, error
):
    config = make_config("run", **fast(qa_file, max_steps=4, save_every=2))
    checkpoints = Path(config.output_dir) / "checkpoints"
    with monkeypatch.context() as patch:
        _fail_writing(patch, name, error)
        with pytest.raises(loop.CheckpointError) as info:
            train(config)
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot write checkpoint {checkpoints / 'step-0000004'}" in message
    assert str(error) in message and "free of" in message  # the cause, and the free space
    assert f"the previous checkpoint, {checkpoints / 'step-0000002'}, is intact" in message
    if isinstance(error, RuntimeError):
        assert "full disk" in message  # torch's error does not say why
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002"]  # no temp directory left
    loop.Checkpointer._read(None, checkpoints / "step-0000002")  # every file at its written size
    if name == "optimizer.bin" and isinstance(error, OSError):
        capsys.readouterr()
        result = train(config)  # space freed: resumes from the intact checkpoint
        assert f"resumed from {checkpoints / 'step-0000002'} at step 2" in capsys.readouterr().out
        assert result.state.step == 4 and models.is_complete_save(config.output_dir)


def _failing_model_save(patch, error: BaseException) -> None:
    """Make the model's own save_pretrained write part of model.safetensors, then fail as a full disk does."""
    cls = type(models.build_tiny())

    def save_pretrained(self, directory, *args, **kwargs):
        Path(directory, "model.safetensors").write_bytes(b"\0" * 100)
        raise error

    patch.setattr(cls, "save_pretrained", save_pretrained)


def test_a_final_save_that_fails_is_a_checkpoint_error_and_keeps_the_earlier_save(tmp_path, tokenizer, monkeypatch):
    from safetensors import SafetensorError

    out = tmp_path / "model"
    models.save_pretrained(models.build_tiny(), tokenizer, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as patch:
        _failing_model_save(patch, SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
        with pytest.raises(loop.CheckpointError) as info:
            models.save_pretrained(models.build_tiny(seed=1), tokenizer, out)
    message = str(info.value)
    assert f"cannot save the model to {out}" in message and "No space left on device" in message
    assert "free of" in message and f"the model saved in {out} before is intact" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp directory, nothing changed
    assert models.is_complete_save(out)


def test_a_failed_final_save_of_a_run_names_its_checkpoint_and_a_rerun_finishes(qa_file, make_config, monkeypatch):
    config = make_config("run", **fast(qa_file, max_steps=2, save_every=2))
    out = Path(config.output_dir)
    with monkeypatch.context() as patch:
        _failing_model_save(patch, OSError(28, "No space left on device"))
        with pytest.raises(loop.CheckpointError) as info:
            train(config)
    assert f"the newest checkpoint, {out / 'checkpoints' / 'step-0000002'}, is intact" in str(info.value)
    assert not [p for p in out.iterdir() if p.name.startswith(".save.")]
    assert not models.is_complete_save(out)
    train(config)
    assert models.is_complete_save(out)


def test_a_save_removes_the_temp_directory_a_killed_save_left(tmp_path, tokenizer):
    out = tmp_path / "model"
    orphan = out / ".save.k1ll3d_x"  # tempfile.mkdtemp(prefix=".save.") names, as a SIGKILL leaves them
    orphan.mkdir(parents=True)
    (orphan / "model.safetensors").write_bytes(b"\0" * 1000)
    not_ours = [out / ".save.mine", out / ".saved"]
    for path in not_ours:
        path.mkdir()
    models.save_pretrained(models.build_tiny(), tokenizer, out)
    assert not orphan.exists()
    assert all(path.is_dir() for path in not_ours)
    assert models.is_complete_save(out)


def test_a_checkpoint_save_removes_partial_temp_checkpoints(qa_file, make_config):
    config = make_config("run", **fast(qa_file, max_steps=2, save_every=2))
    checkpoints = Path(config.output_dir) / "checkpoints"
    for name in (".tmp-step-0000003", ".tmp-step-0000002"):  # a failed save of another step; one of this step
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "model.safetensors").write_bytes(b"\0" * 1000)
    (checkpoints / ".tmp-notes").mkdir()  # not rlhfkit's naming: kept
    train(config)
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-notes", "step-0000002"]


def test_a_resumed_probe_replaces_the_rows_of_its_step_and_later(tmp_path, tokenizer):
    """A run killed after probing step 2 and 4 and resumed from its step-2 checkpoint probes step 2 again:
    frontier.jsonl must then hold step 2 once, and nothing of the old step 4 (logged again later)."""
    from rlhfkit.data.io import read_jsonl_records, write_jsonl
    from rlhfkit.modeling import models
    from rlhfkit.probe import FRONTIER_FILE, FrontierProbe, ProbeOptions

    policy = models.load_causal_lm(models.TINY)
    options = ProbeOptions(probe_points=2, probe_max_prompts=2, probe_max_new_tokens=4)
    probe = FrontierProbe(
        options,
        tokenizer=tokenizer,
        reference=policy,
        gold=lambda p, r: [float(len(x)) for x in r],
        proxy=None,
        output_dir=tmp_path,
        seed=0,
        precision="fp32",
    )
    stale = [{"step": 0, "gold": 1.0}, {"step": 2, "gold": -5.0}, {"step": 4, "gold": -9.0}]
    write_jsonl(tmp_path / FRONTIER_FILE, stale)
    row = probe(policy, 2, 4)
    rows = read_jsonl_records(tmp_path / FRONTIER_FILE)
    assert [r["step"] for r in rows] == [0, 2]
    assert rows[0] == stale[0] and rows[1]["gold"] == row["gold"] != -5.0
