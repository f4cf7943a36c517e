"""Saves never replace what they were not told to, never leave half a folder, and clean up after the
interrupted ones: concurrent saves, overwrite onto foreign folders, kill -9 at many moments."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from diffquant.atomic import atomic_directory, clear_stale_work_folders
from diffquant.checkpoint import MANIFEST, TENSORS, CheckpointError, load_quantized, save_quantized
from diffquant.workflows import quantize_folder
from tests.io.conftest import dit_output, quantized_dit  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


# -- what may be replaced ------------------------------------------------------------------------

@pytest.mark.parametrize("occupant", ["foreign folder", "file", "symlink to a folder", "non-empty parent file"])
def test_overwrite_refuses_what_diffquant_did_not_write(quantized_dit, tmp_path, occupant):  # noqa: F811
    target = tmp_path / "q"
    if occupant == "foreign folder":
        target.mkdir()
        (target / "thesis.tex").write_text("years of work")
    elif occupant == "file":
        target.write_text("years of work")
    elif occupant == "symlink to a folder":
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / "thesis.tex").write_text("years of work")
        target.symlink_to(tmp_path / "real")
    else:
        (tmp_path / "parent").write_text("a file")
        target = tmp_path / "parent" / "q"
    before = siblings(tmp_path / "x")
    with pytest.raises((FileExistsError, PermissionError, NotADirectoryError)):
        save_quantized(quantized_dit, target, overwrite=True)
    assert siblings(tmp_path / "x") == before
    assert all(p.read_text() == "years of work" for p in tmp_path.rglob("thesis.tex"))


def test_overwrite_replaces_a_diffquant_folder_and_an_empty_one(quantized_dit, tmp_path):  # noqa: F811
    first = save_quantized(quantized_dit, tmp_path / "q")
    save_quantized(quantized_dit, first, overwrite=True)
    (tmp_path / "empty").mkdir()
    save_quantized(quantized_dit, tmp_path / "empty", overwrite=True)
    assert siblings(first) == ["empty", "q"]
    assert torch.equal(dit_output(load_quantized(first)), dit_output(load_quantized(tmp_path / "empty")))


def test_quantize_checks_the_output_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "mine.txt").write_text("keep")

    def no_work(*args, **kwargs):
        raise AssertionError("the recipe was resolved before the output was checked")

    monkeypatch.setattr("diffquant.workflows.resolve_recipe", no_work)
    with pytest.raises(FileExistsError, match="already exists"):
        quantize_folder("fmnist-dit", "w8a8", tmp_path / "q")
    with pytest.raises(FileExistsError, match="not a diffquant folder"):
        quantize_folder("fmnist-dit", "w8a8", tmp_path / "q", overwrite=True)
    assert (tmp_path / "q" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("value", [0, -5, True, 2.5])
def test_quantize_refuses_zero_or_negative_calibration_sizes(tmp_path, value):
    for option in ("calib_samples", "calib_steps"):
        with pytest.raises(ValueError, match=f"{option.replace('_', '-')} must be a positive integer"):
            quantize_folder("fmnist-dit", "w8a8", tmp_path / "q", **{option: value})
    assert list(tmp_path.iterdir()) == []


# -- concurrent saves ------------------------------------------------------------------------------

def test_concurrent_saves_to_one_new_folder_one_wins_the_rest_refuse(tmp_path):
    """Eight writers race for the same new folder, 25 times: one commits, the others get
    FileExistsError, the winner's folder is whole and nothing else is left."""
    for round_ in range(25):
        target = tmp_path / f"race{round_}"
        barrier, outcomes = threading.Barrier(8), []

        def write(i: int, target: Path = target, barrier: threading.Barrier = barrier,
                  outcomes: list = outcomes) -> None:
            try:
                with atomic_directory(target) as tmp:
                    for part in range(5):
                        (tmp / f"part{part}").write_text(str(i))
                    barrier.wait()
                outcomes.append(i)
            except FileExistsError:
                outcomes.append(None)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes if o is not None]
        assert len(winners) == 1, f"round {round_}: {outcomes}"
        assert {p.read_text() for p in target.iterdir()} == {str(winners[0])}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"race{r}" for r in range(25))


SAVE_SCRIPT = """
import sys, time
from diffquant.checkpoint import load_quantized, save_quantized
model = load_quantized(sys.argv[1])
start = float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
try:
    save_quantized(model, sys.argv[2])
    print("saved")
except FileExistsError:
    print("refused")
"""


@pytest.mark.slow
def test_concurrent_save_processes_one_wins(quantized_dit, tmp_path):  # noqa: F811
    source = save_quantized(quantized_dit, tmp_path / "source")
    for round_ in range(3):
        target, start = tmp_path / f"race{round_}", time.time() + 12
        procs = [subprocess.Popen([sys.executable, "-c", SAVE_SCRIPT, str(source), str(target), str(start)],
                                  stdout=subprocess.PIPE, text=True, cwd=REPO) for _ in range(4)]
        outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
        assert outs == ["refused", "refused", "refused", "saved"], outs
        load_quantized(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race0", "race1", "race2", "source"]


# -- interrupted saves -----------------------------------------------------------------------------

LOOP_SCRIPT = """
import sys
from pathlib import Path
from diffquant.checkpoint import load_quantized, save_quantized
model = load_quantized(sys.argv[1])
Path(sys.argv[3]).write_text("ready")
while True:
    save_quantized(model, sys.argv[2], overwrite=True)
"""


def kill_saves(quantized_model, tmp_path: Path, kills: int) -> None:
    """Kill a process that keeps re-saving over a folder, at random moments; after each kill the folder
    loads whole, and the next save clears every leftover."""
    source = save_quantized(quantized_model, tmp_path / "source")
    target = save_quantized(quantized_model, tmp_path / "runs" / "q")
    expected = dit_output(load_quantized(source))
    rng = random.Random(0)
    for k in range(kills):
        ready = tmp_path / f"ready{k}"
        proc = subprocess.Popen([sys.executable, "-c", LOOP_SCRIPT, str(source), str(target), str(ready)],
                                cwd=REPO, stderr=subprocess.DEVNULL)
        while not ready.exists():
            assert proc.poll() is None, "the saving process died before it was ready"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        clear_stale_work_folders(target)  # what the next save does first
        assert siblings(target) == ["q"], f"kill {k}: leftovers {siblings(target)}"
        assert torch.equal(dit_output(load_quantized(target)), expected), f"kill {k}: the folder is not whole"


def test_kill_9_during_saves_never_loses_the_folder(quantized_dit, tmp_path):  # noqa: F811
    kill_saves(quantized_dit, tmp_path, kills=2)


@pytest.mark.slow
def test_kill_9_during_saves_at_many_moments(quantized_dit, tmp_path):  # noqa: F811
    kill_saves(quantized_dit, tmp_path, kills=25)


def test_a_folder_moved_aside_by_a_dead_save_is_put_back(quantized_dit, tmp_path, monkeypatch):  # noqa: F811
    """Without an atomic exchange a save moves the old folder aside, then renames the new one in; a kill
    between the two leaves only the old one, which the next save puts back."""
    target = save_quantized(quantized_dit, tmp_path / "q")
    before = (target / TENSORS).read_bytes()
    target.rename(tmp_path / f".q.old-{dead_pid()}-0123abcd")
    (tmp_path / f".q.tmp-{dead_pid()}-4567cdef").mkdir()
    clear_stale_work_folders(target)
    assert siblings(target) == ["q"] and (target / TENSORS).read_bytes() == before


def test_the_fallback_without_an_atomic_exchange_replaces_whole(quantized_dit, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr("diffquant.atomic._renameat2", lambda *args: False)
    target = save_quantized(quantized_dit, tmp_path / "q")
    (target / "stale.txt").write_text("from the old folder")
    save_quantized(quantized_dit, target, overwrite=True)
    assert siblings(target) == ["q"] and not (target / "stale.txt").exists() and (target / MANIFEST).is_file()
    with pytest.raises(FileExistsError):
        save_quantized(quantized_dit, target)


def test_work_folders_of_a_running_save_are_left_alone(quantized_dit, tmp_path):  # noqa: F811
    live = tmp_path / f".q.tmp-{os.getpid()}-89abcdef"
    live.mkdir()
    save_quantized(quantized_dit, tmp_path / "q")
    assert live.is_dir()


def test_old_style_leftovers_are_cleared(quantized_dit, tmp_path):  # noqa: F811
    target = save_quantized(quantized_dit, tmp_path / "q")
    for name in (".q.tmp-0123abcd", ".q.old-4567cdef"):  # as saves before work folders named their pid
        (tmp_path / name).mkdir()
        (tmp_path / name / "big").write_bytes(b"0" * 1000)
    save_quantized(quantized_dit, target, overwrite=True)
    assert siblings(target) == ["q"]


def test_a_save_that_fails_midway_leaves_nothing(quantized_dit, tmp_path, monkeypatch):  # noqa: F811
    target = save_quantized(quantized_dit, tmp_path / "q")
    before = (target / TENSORS).read_bytes()
    monkeypatch.setattr("diffquant.checkpoint.save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_quantized(quantized_dit, target, overwrite=True)
    assert siblings(target) == ["q"] and (target / TENSORS).read_bytes() == before
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "never")


@pytest.mark.parametrize("where", ["a folder", "below a file"])
def test_eval_checks_its_output_files_before_sampling(tmp_path, monkeypatch, where):
    from diffquant.eval.runner import evaluate

    monkeypatch.setattr("diffquant.eval.runner.run_evaluation",
                        lambda *a, **k: pytest.fail("sampling started before the output path was checked"))
    (tmp_path / "file").write_text("x")
    path = tmp_path if where == "a folder" else tmp_path / "file" / "metrics.json"
    for option in ("json_path", "grid_path"):
        with pytest.raises(OSError, match=str(tmp_path)):
            evaluate("fmnist-dit", samples=10, **{option: path})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("marker", ['{"model": "fmnist-dit"}', "[]", "{not json", '{"zoo": 3}'])
def test_a_malformed_zoo_marker_is_one_clear_error(tmp_path, marker):
    from diffquant.workflows import ZOO_MARKER, zoo_name_of

    (tmp_path / ZOO_MARKER).write_text(marker)
    with pytest.raises(ValueError, match=ZOO_MARKER):
        zoo_name_of(tmp_path)
