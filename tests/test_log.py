"""rlhfkit.log: library messages reach the current stdout on the main process only."""

from __future__ import annotations

import logging
import subprocess
import sys

from rlhfkit import log


def test_info_and_warning_print_on_the_main_process(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    log.info("one line")
    log.warning("careful")
    assert capsys.readouterr().out == "one line\ncareful\n"
    monkeypatch.setenv("RANK", "0")
    log.info("rank zero")
    assert capsys.readouterr().out == "rank zero\n"


def test_other_processes_print_nothing(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log.info("hidden")
    log.warning("hidden too")
    assert capsys.readouterr() == ("", "")


def test_the_level_silences_info_lines(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    logger = logging.getLogger("rlhfkit")
    logger.setLevel(logging.WARNING)
    try:
        log.info("quiet")
        log.warning("loud")
    finally:
        logger.setLevel(logging.INFO)
    assert capsys.readouterr().out == "loud\n"


def test_a_library_message_is_printed_once_in_a_subprocess_per_rank():
    code = "from rlhfkit import log; log.info('hello')"
    outs = [
        subprocess.run([sys.executable, "-c", code], env={"RANK": rank, "PATH": ""}, capture_output=True, text=True).stdout
        for rank in ("0", "1")
    ]
    assert outs == ["hello\n", ""]
