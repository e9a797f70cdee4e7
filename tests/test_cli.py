"""The CLI surface: help lists every key, bad input gives one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

from detector.cli import main
from repo_paths import REPO_ROOT


def test_help_lists_every_train_key(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("epochs=100", "lr0=", "attention=", "close_mosaic=", "amp=auto"):
        assert key in out


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian' (did you mean 'train'?)" in capsys.readouterr().err


def test_a_typo_in_a_sub_command_names_it_and_suggests(capsys):
    """It said "unknown command 'bench'" for `bench modles`, and no did-you-mean for any command."""
    assert main(["bench", "modles"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "detector: error: unknown command 'bench modles' (did you mean 'bench models'?)"
    assert main(["data", "imgsz=320"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "detector: error: 'data' needs a command: synth, check, convert"


def test_help_command_prints_the_usage_on_stdout(capsys):
    assert main(["help"]) == 0
    captured = capsys.readouterr()
    assert "commands:" in captured.out and captured.err == ""
    assert main(["bench", "--help"]) == 0  # a group's help: the usage, which lists the group's commands
    captured = capsys.readouterr()
    assert "  bench track " in captured.out and captured.err == ""
    assert main(["bench"]) == 2 and "'bench' needs a command" in capsys.readouterr().err


def test_bad_key_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "detector", "train", "epohcs=3"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["detector train: error: command line: unknown key 'epohcs' (did you mean 'epochs'?)"]
    verbose = subprocess.run([sys.executable, "-m", "detector", "train", "epohcs=3", "--verbose"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_run_freezes_the_collector_after_main(monkeypatch, capsys):
    import gc

    from detector.cli import run

    monkeypatch.setattr(sys, "argv", ["detector", "trian"])
    before = gc.get_freeze_count()
    try:
        assert run() == 2  # main's status is passed on
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_program_exit_still_runs_atexit_handlers_and_flushes():
    code = ("import atexit, sys; atexit.register(lambda: print('atexit ran', flush=True)); sys.argv = ['detector']; "
            "from detector.cli import run; raise SystemExit(run())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0
    assert "commands:" in proc.stdout and proc.stdout.rstrip().endswith("atexit ran")


def test_help_into_a_closed_pipe_is_no_traceback():
    """`detector ablate --help | head -3`: the reader leaves before the help is written; the program ends quietly."""
    proc = subprocess.Popen([sys.executable, "-m", "detector", "ablate", "--help"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # no reader: every write fails with EPIPE
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err.decode() and "BrokenPipeError" not in err.decode()
