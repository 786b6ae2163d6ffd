"""`deadneuron train` and `deadneuron patch` stopped mid-run (issue 7): SIGKILL at several moments, also
inside a save, and SIGTERM / Ctrl-C. Afterwards --out holds a complete checkpoint, the previous one or a
newer one, never a partial file; only a hidden `.NAME.*.tmp` may remain, and only after SIGKILL.

Real subprocesses of the CLI on a tiny config: 2 steps per epoch and a timeline point, hence a save, at
every epoch. "Inside a save" is made exact: when the temp file of a save appears the child is stopped
(SIGSTOP); if the temp file is still there, the child is frozen between creating it and renaming it.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="watches the child through /proc")

# The statistics kernels' cold torch.compile costs ~5 s in every new process; these tests are about
# writes and signals, so the children run them eagerly.
ENV = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
TINY = ["--config", "NUM_GRIDS=16", "--config", "BATCH_SIZE=8", "--config", "CHANNELS=8", "--config", "SLOT_DIM=8",
        "--config", "NUM_SLOTS=3", "--config", "TIMELINE_GRIDS=8", "--config", "TIMELINE_EVERY=1", "--threads", "1",
        "--no-progress"]  # fmt: skip
LONG_RUN = ["train", *TINY, "--config", "SEED=1", "--max-steps", "2000"]  # killed long before its end
PATCH = ["--activation", "leaky", "--max-steps", "2", "--no-verify", "--audit-grids", "8", "--threads", "1", "--no-progress"]  # fmt: skip
TIMEOUT = 120.0


def cli(*args: object) -> list[str]:
    return [sys.executable, "-c", "from deadneuron.cli import main; main()", *map(str, args)]


def _sigint_default() -> None:
    # A child of a shell that ignores SIGINT (a background job) would inherit that; Ctrl-C must raise.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(cli(*args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_default)  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temps(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path.parent) if n.startswith(f".{path.name}.") and n.endswith(".tmp"))


def identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> bool:
    """Poll ``condition`` until it holds (True) or the child ends or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.0005)
    return False


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (FileNotFoundError, ProcessLookupError):
        return False


def freeze_inside_save(proc: subprocess.Popen[str], path: Path, nth: int = 1) -> bool:
    """Leave the child stopped inside an atomic save of ``path``, from the nth save caught on (True), or
    False if it ended first. A save is caught when its temp file outlives the SIGSTOP."""
    caught = 0
    while wait_until(lambda: bool(temps(path)), proc):
        os.kill(proc.pid, signal.SIGSTOP)
        if wait_until(lambda: _stopped(proc.pid), proc) and temps(path):
            caught += 1
            if caught == nth:
                return True
        os.kill(proc.pid, signal.SIGCONT)
        wait_until(lambda: not temps(path), proc)  # let that save finish: the next one counts anew
    return False


def finish(proc: subprocess.Popen[str], sig: int | None = None) -> tuple[int, str, float]:
    """Send ``sig`` (resuming a stopped child so that it can act on it); exit code, stderr, seconds taken."""
    began = time.monotonic()
    if sig is not None:
        os.kill(proc.pid, sig)
        if sig != signal.SIGKILL:
            os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, stderr, time.monotonic() - began


def load(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``: complete, since weights_only loading reads it through to the end."""
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "deadneuron-checkpoint" and isinstance(ckpt["state_dict"], dict)
    return ckpt


def assert_only_temps_left(path: Path, *, allowed: int) -> None:
    """Besides ``path``, at most ``allowed`` hidden temp files of it, never a partial file under its name."""
    others = sorted(set(os.listdir(path.parent)) - {path.name})
    assert others == temps(path) and len(others) <= allowed, others


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete checkpoint (seed 0, step 4) that the runs below overwrite."""
    path = tmp_path_factory.mktemp("good") / "good.pth"
    done = subprocess.run(cli("train", *TINY, "--no-optimizer-state", "--max-steps", "4", "--out", path), env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    ckpt = load(path)
    assert ckpt["step"] == 4 and ckpt["config"]["SEED"] == 0
    assert ckpt["optimizer_state"] is None  # --no-optimizer-state
    return path


@pytest.fixture
def out(tmp_path: Path, good: Path) -> Path:
    """A folder of its own with a copy of the good checkpoint where the run writes."""
    return Path(shutil.copy(good, tmp_path / "run.pth"))


def test_train_saves_at_every_timeline_point(out: Path) -> None:
    proc = start(*LONG_RUN, "--out", out, "--force")
    try:
        seen = {identity(out)}
        for _ in range(3):  # three saves, each replacing the file by a complete newer one
            assert wait_until(lambda: identity(out) not in seen and not temps(out), proc), proc.stderr
            seen.add(identity(out))
            ckpt = load(out)
            assert ckpt["config"]["SEED"] == 1 and ckpt["step"] % 2 == 0 and ckpt["optimizer_state"] is not None
    finally:
        code, _, _ = finish(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert_only_temps_left(out, allowed=1)


@pytest.mark.parametrize("nth", [1, 3], ids=["first-save", "third-save"])
def test_sigkill_inside_a_save_leaves_the_file_as_it_was_before_that_save(out: Path, good: Path, nth: int) -> None:
    proc = start(*LONG_RUN, "--out", out, "--force")
    assert freeze_inside_save(proc, out, nth), proc.communicate()[1]
    before = sha256(out)
    code, _, _ = finish(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert sha256(out) == before
    ckpt = load(out)
    if nth == 1:
        assert before == sha256(good)  # the first save of the new run never completed
    else:
        assert ckpt["config"]["SEED"] == 1 and ckpt["step"] >= 2  # a newer complete one
    assert_only_temps_left(out, allowed=1)
    assert len(temps(out)) == 1  # the partial file: hidden, never under the checkpoint's name


def test_sigkill_inside_a_save_of_a_resumed_run(out: Path, good: Path) -> None:
    source = Path(shutil.copy(good, out.parent / "source.pth"))
    proc = start("train", "--resume", source, "--max-steps", "2000", "--threads", "1", "--no-progress",
                 "--out", out, "--force")  # fmt: skip
    assert freeze_inside_save(proc, out, nth=2), proc.communicate()[1]
    before = sha256(out)
    code, _, _ = finish(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL and sha256(out) == before
    ckpt = load(out)
    assert ckpt["step"] > 4 and len(ckpt["history"]) == ckpt["epoch"]  # continues the run of the source
    assert sha256(source) == sha256(good)
    (out.parent / "source.pth").unlink()
    assert_only_temps_left(out, allowed=1)


def test_sigkill_at_random_moments(out: Path, good: Path) -> None:
    rng = random.Random(20240607)
    previous = sha256(good)
    for delay in (rng.uniform(0.5, 4.5), rng.uniform(4.5, 8.0)):
        proc = start(*LONG_RUN, "--out", out, "--force")
        time.sleep(delay)  # the moment of the kill: before, inside or between saves
        code, _, _ = finish(proc, signal.SIGKILL)
        assert code == -signal.SIGKILL
        ckpt = load(out)
        assert sha256(out) == previous or ckpt["config"]["SEED"] == 1, "the previous one or a newer complete one"
        previous = sha256(out)
        assert_only_temps_left(out, allowed=3)


def test_patch_killed_inside_its_save_leaves_the_existing_out(out: Path, good: Path) -> None:
    for _ in range(3):  # patch saves once: on a very fast disk the poll can miss that save; then try again
        proc = start("patch", good, *PATCH, "--out", out, "--force")
        if freeze_inside_save(proc, out):
            break
        assert finish(proc)[0] == 0, proc.stderr
        shutil.copy(good, out)
    else:
        pytest.fail("never caught the patch inside its save")
    code, _, _ = finish(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert sha256(out) == sha256(good) and load(out)["step"] == 4
    assert_only_temps_left(out, allowed=1)


def test_patch_killed_at_a_random_moment_leaves_the_old_or_the_patched_checkpoint(out: Path, good: Path) -> None:
    digest = sha256(good)
    proc = start("patch", good, *PATCH, "--out", out, "--force")
    time.sleep(random.Random(7).uniform(2.0, 6.0))
    finish(proc, signal.SIGKILL)
    ckpt = load(out)
    assert sha256(out) == digest or (ckpt["config"]["ACTIVATION"] == "leaky" and "patch" in ckpt)
    assert sha256(good) == digest  # the input is never touched
    assert_only_temps_left(out, allowed=1)


def _inside_first_save(proc: subprocess.Popen[str], out: Path) -> int | None:
    assert freeze_inside_save(proc, out, nth=1), proc.communicate()[1]
    return 2  # that save is let finish: the checkpoint of epoch 1


def _inside_second_save(proc: subprocess.Popen[str], out: Path) -> int | None:
    assert freeze_inside_save(proc, out, nth=2), proc.communicate()[1]
    return 4


def _between_saves(proc: subprocess.Popen[str], out: Path) -> int | None:
    first = identity(out)
    assert wait_until(lambda: identity(out) != first and not temps(out), proc), proc.communicate()[1]
    return None  # some later step


@pytest.mark.parametrize(
    ("sig", "moment", "code"),
    [
        pytest.param(signal.SIGTERM, _inside_first_save, 143, id="sigterm-inside-the-first-save"),
        pytest.param(signal.SIGINT, _inside_second_save, 130, id="ctrl-c-inside-a-later-save"),
        pytest.param(signal.SIGINT, _between_saves, 130, id="ctrl-c-between-saves"),
    ],
)
def test_sigterm_and_ctrl_c_stop_with_one_line_and_the_last_complete_checkpoint(
    out: Path, sig: int, moment: Callable[[subprocess.Popen[str], Path], int | None], code: int
) -> None:
    proc = start(*LONG_RUN, "--out", out, "--force")
    step = moment(proc, out)
    exit_code, stderr, seconds = finish(proc, sig)
    assert exit_code == code, stderr
    assert seconds < 30, "stops promptly"
    # the Monitor's one line about the GRU cell's gates (not measured) may come before: one line each
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("deadneuron: warning: module ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert lines[0].startswith(f"deadneuron: interrupted by {name}: {out} holds the last complete checkpoint"), lines[0]
    ckpt = load(out)
    assert ckpt["config"]["SEED"] == 1 and ckpt["step"] == (step or ckpt["step"]) >= 2
    said = re.search(r"\(step (\d+)\); continue with --resume", lines[0])
    assert said and int(said.group(1)) == ckpt["step"], lines[0]
    assert_only_temps_left(out, allowed=0)  # a save in progress finished; none was left half-written


def test_ctrl_c_before_the_first_save_says_nothing_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from arc_model.adapter import ArcSlotAdapter
    from deadneuron.cli import app

    def interrupted(self: Any, config: Any, *, init: Any = None, max_steps: Any = None, callbacks: Any = (),
                    progress: bool = False, out: Any = None, overwrite: bool = False, save_optimizer: bool = True) -> Any:  # fmt: skip
        raise KeyboardInterrupt

    monkeypatch.setattr(ArcSlotAdapter, "train", interrupted)
    result = CliRunner().invoke(app, ["train", *TINY, "--out", str(tmp_path / "new.pth")])
    assert result.exit_code == 130
    assert result.stderr.strip() == "deadneuron: interrupted by Ctrl-C before the first checkpoint was written: nothing was written"
    assert list(tmp_path.iterdir()) == []


# --- Ctrl-C inside an atomic write, in-process (Python's default SIGINT handler) ---------------------


@pytest.mark.parametrize("times", [1, 2])
def test_ctrl_c_inside_a_save_is_an_interrupt_not_a_write_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, times: int
) -> None:
    """Ctrl-C lands at the first line of the file writer's write(), where Python's default handler
    raised inside torch.save and the save was reported as a failed write (exit 7). Now one Ctrl-C lets
    the save complete (a loadable file), then raises KeyboardInterrupt; two raise it at once, leaving
    nothing at the path and no temp file."""
    from deadneuron import _atomic

    original = _atomic._RecordingWriter.write
    pressed: list[int] = []

    def write(self: object, data: bytes) -> int:
        if len(pressed) < times:
            pressed.append(1)
            signal.raise_signal(signal.SIGINT)
        return original(self, data)

    monkeypatch.setattr(_atomic._RecordingWriter, "write", write)
    target = tmp_path / "ckpt.pth"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        _atomic.atomic_save({"w": torch.ones(3)}, target)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if times == 1:
        assert torch.load(target, weights_only=True)["w"].tolist() == [1.0, 1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == (["ckpt.pth"] if times == 1 else [])
