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

from rlhfkit import iterated, loop, models
from rlhfkit.sft import train
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
    synced_after = {path for kind, path, _ in events[at + 1:] if kind == "fsync"}
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
    assert not [n for n in names if n.startswith(("custom_checkpoint", "scheduler"))
                and not n.endswith(".json")], names
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
    stale = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "pytorch_model.bin"]
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
