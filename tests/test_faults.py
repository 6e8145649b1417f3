"""Fault injection on real `python train.py` runs: kill -9 (also mid-save), SIGTERM/SIGINT,
damaged checkpoints, non-finite steps, bad input and a full disk.

A fault never loses work or corrupts a checkpoint: after it, the same command resumes and ends
with the losses (metrics.jsonl: step, train_loss, val_loss) and parameters of an uninterrupted
run, bit for bit on CPU. metrics.jsonl of a resumed run reads as one clean run: the trainer drops
records past the checkpoint it resumed from, which a killed run may have logged.
"""

import glob
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from conftest import ROOT, device_env, train_command
from conftest import train as shared_train

TMP = ".orbax-checkpoint-tmp"  # orbax-checkpoint 0.12.8 saves into <step>.orbax-checkpoint-tmp
# 40 steps, a checkpoint every 2 and a log every 4: checkpoints at 2 mod 4 hold the metric sums
# of a half-finished log interval, so resuming from them checks those sums are restored too.
RUN = (
    "--config.train.num_steps=40",
    "--config.checkpoint.every_steps=2",
    "--config.train.log_every_steps=4",
    "--config.train.sample_tokens=0",
)


# The runs share a persistent compilation cache (filled by the uninterrupted run): it halves
# each run's time, and a cached executable computes exactly what a fresh compile does.
COMPILATION_CACHE = tempfile.mkdtemp(prefix="test_faults-jax-cache-")


@pytest.fixture(scope="module", autouse=True)
def _remove_compilation_cache():
    yield
    shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)


def environment(devices=1):
    return device_env(
        devices,
        JAX_COMPILATION_CACHE_DIR=COMPILATION_CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )


def train(workdir, *overrides, devices=1):
    """Runs train.py to the end; returns the CompletedProcess (any exit code)."""
    return shared_train(workdir, *overrides, check=False, env=environment(devices))


class Run:
    """train.py in the background, its output in temporary files (a pipe could fill up)."""

    def __init__(self, workdir, *overrides):
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, *train_command(workdir, *overrides)],
            cwd=ROOT,
            env=environment(),
            stdout=self.out,
            stderr=self.err,
            text=True,
        )

    def wait_for(self, condition, timeout=240, poll=0.01):
        """Polls `condition` until it holds (True) or the process ends first (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return bool(condition())
            time.sleep(poll)
        self.proc.kill()
        raise AssertionError(f"timed out; stderr:\n{self.stderr[-2000:]}")

    def wait(self, timeout=300):
        return self.proc.wait(timeout=timeout)

    @property
    def stdout(self):
        self.out.seek(0)
        return self.out.read()

    @property
    def stderr(self):
        self.err.seek(0)
        return self.err.read()


def complete_steps(workdir):
    """Steps Orbax lists: directories named by digits only."""
    directory = os.path.join(workdir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n) for n in names if n.isdigit())


def saves_in_progress(workdir):
    directory = os.path.join(workdir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n.split(".")[0]) for n in names if TMP in n)


def records(workdir, *, polling=False):
    """metrics.jsonl; while polling a running process, a line being written is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    if polling:
        lines = [line for line in lines if line.endswith("\n")]
    return [json.loads(line) for line in lines if line.strip()]


def losses(workdir):
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in records(workdir)]


def params(workdir, step=None):
    import jax

    from transformer.store.rundir import load_params

    return jax.tree.leaves(load_params(workdir, step)[1])


def assert_same_run(workdir, reference):
    """Losses by step (each step once) and final parameters equal the reference's, bit for
    bit."""
    assert losses(workdir) == losses(reference)
    for a, b in zip(params(workdir), params(reference), strict=True):
        np.testing.assert_array_equal(a, b)


def last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = train(workdir, *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [s for s, _, _ in losses(workdir)]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    return workdir


# ---------------------------------------------------------------------------------------------
# Killed, signalled, damaged: the run resumes and ends as if nothing happened.


@pytest.mark.slow
def test_kill_9_at_random_steps_three_times_then_resume_is_exact(uninterrupted, tmp_path):
    workdir = str(tmp_path / "killed")
    rng = random.Random(20240611)
    # One kill in each third of the run, once the newest checkpoint reaches a random step, plus
    # a random delay: the kill lands mid-step, mid-log or mid-save.
    for low, high in ((3, 10), (16, 24), (28, 33)):
        target = rng.randint(low, high)
        run = Run(workdir, *RUN)
        assert run.wait_for(lambda t=target: max(complete_steps(workdir), default=0) >= t), (
            run.stderr[-2000:]
        )
        time.sleep(rng.uniform(0.0, 0.2))
        run.proc.send_signal(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
        assert max(complete_steps(workdir)) < 40
    run = Run(workdir, *RUN)
    assert run.wait() == 0, run.stderr[-3000:]
    assert re.search(r"^resuming from the checkpoint at step \d+$", run.stdout, re.M)
    assert_same_run(workdir, uninterrupted)


def test_kill_9_during_a_checkpoint_save_resumes_from_the_previous_one(uninterrupted, tmp_path):
    workdir = str(tmp_path / "killed_saving")
    for _ in range(4):  # a kill can land just after the rename; then try a later save
        newest = max(complete_steps(workdir), default=8)
        run = Run(workdir, *RUN)
        caught = run.wait_for(
            lambda n=newest: any(s > n for s in saves_in_progress(workdir)), poll=0.0005
        )
        run.proc.send_signal(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL and caught, run.stderr[-2000:]
        if saves_in_progress(workdir):
            break
    else:
        pytest.fail("no kill landed inside a save")
    [half_written] = saves_in_progress(workdir)
    previous = max(complete_steps(workdir))
    assert previous == half_written - 2
    # The half-written directory is not a checkpoint, for Orbax or for load_params.
    from transformer.store.checkpoint import Checkpoints

    readonly = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    assert readonly.all_steps()[-1] == previous
    readonly.close()
    assert all(np.isfinite(x).all() for x in params(workdir))

    run = Run(workdir, *RUN)
    assert run.wait() == 0, run.stderr[-3000:]
    assert f"resuming from the checkpoint at step {previous}\n" in run.stdout
    assert not saves_in_progress(workdir)  # the next start removed the half-written save
    assert_same_run(workdir, uninterrupted)


def test_sigterm_and_sigint_stop_with_a_checkpoint_at_that_step(uninterrupted, tmp_path):
    workdir = str(tmp_path / "signalled")
    # No periodic saves: the checkpoints seen are the ones the signals caused.
    overrides = (*RUN, "--config.checkpoint.every_steps=1000")
    stops = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        run = Run(workdir, *overrides)
        after = stops[-1] if stops else 0
        assert run.wait_for(
            lambda a=after: any(r["step"] > a for r in records(workdir, polling=True))
        )
        run.proc.send_signal(sig)
        assert run.wait() == 0, run.stderr[-3000:]
        found = re.search(rf"stopped by {sig.name} at step (\d+); checkpoint saved", run.stdout)
        assert found, run.stdout
        stops.append(int(found.group(1)))
        assert complete_steps(workdir) == stops and stops[-1] < 40
        assert "Traceback" not in run.stderr
        if len(stops) == 2:
            assert f"resuming from the checkpoint at step {stops[0]}\n" in run.stdout
    run = Run(workdir, *RUN)
    assert run.wait() == 0, run.stderr[-3000:]
    assert f"resuming from the checkpoint at step {stops[-1]}\n" in run.stdout
    assert_same_run(workdir, uninterrupted)


def _array_files(workdir, step):
    """The files holding a checkpoint's arrays (OCDBT data files, under `d/` directories)."""
    pattern = os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*")
    files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    assert files
    return files


def test_truncated_checkpoint_warns_and_resumes_from_the_previous_step(uninterrupted, tmp_path):
    workdir = str(tmp_path / "truncated")
    shutil.copytree(uninterrupted, workdir)
    assert complete_steps(workdir)[-2:] == [38, 40]
    for path in _array_files(workdir, 40):
        os.truncate(path, os.path.getsize(path) // 2)

    proc = train(workdir, *RUN)  # the same command finishes the last two steps again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the checkpoint at step 40 is damaged or incomplete" in proc.stderr
    assert "resuming from step 38 instead of the damaged step(s) 40" in proc.stderr
    assert "resuming from the checkpoint at step 38\n" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "40.damaged"))  # kept, aside
    assert complete_steps(workdir)[-1] == 40  # saved again
    # Step 38 sits mid-interval (log every 4): its saved metric sums make step 40's record exact.
    assert_same_run(workdir, uninterrupted)


# Orbax's reader threads leave "Event loop is closed" callbacks behind after a failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_load_params_falls_back_past_a_deleted_checkpoint_file(uninterrupted, tmp_path, caplog):
    from transformer.store.checkpoint import CheckpointError

    workdir = str(tmp_path / "deleted")
    shutil.copytree(uninterrupted, workdir)
    for path in _array_files(workdir, 40):
        os.remove(path)
    with pytest.raises(CheckpointError, match="step 40"):
        params(workdir, step=40)
    with caplog.at_level(logging.WARNING):
        fallback = params(workdir)
    assert "the checkpoint at step 40 is damaged or incomplete" in caplog.text
    assert "loaded the checkpoint at step 38 instead of the damaged step(s) 40" in caplog.text
    for a, b in zip(fallback, params(uninterrupted, step=38), strict=True):
        np.testing.assert_array_equal(a, b)
    assert complete_steps(workdir)[-1] == 40  # reading leaves the workdir alone


# ---------------------------------------------------------------------------------------------
# Non-finite steps.

NAN = (  # lr 1e30: step 2 (the first with lr > 0) blows the weights up, step 3 is NaN
    "--config.train.learning_rate=1e30",
    "--config.train.num_steps=10",
    "--config.train.log_every_steps=5",  # step 3 is between logs: caught before the save at 4
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.keep=0",
    "--config.train.sample_tokens=0",
)


def test_nonfinite_stop_exits_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan_stop")
    proc = train(workdir, *NAN)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last_line(proc.stderr) == (
        "train.py: error: non-finite loss or gradients at step 3 (the checkpoint at step 2 is "
        "kept); lower train.learning_rate or raise train.warmup_steps, or set "
        "train.nonfinite=skip to skip non-finite updates"
    )
    assert "Traceback" not in proc.stderr
    assert complete_steps(workdir) == [2]  # the NaN state at step 4 was never saved
    assert all(np.isfinite(x).all() for x in params(workdir))


def test_nonfinite_skip_counts_skipped_steps_and_continues(tmp_path):
    workdir = str(tmp_path / "nan_skip")
    proc = train(workdir, *NAN, "--config.train.nonfinite=skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 10" in proc.stdout
    logged = records(workdir)
    assert [r["step"] for r in logged] == [5, 10]
    assert [r.get("nonfinite_steps") for r in logged] == [3, 5]  # steps 3-10 were skipped
    assert complete_steps(workdir) == [2, 4, 6, 8, 10]
    # Skipped updates leave the parameters as step 2 left them.
    for a, b in zip(params(workdir, step=10), params(workdir, step=2), strict=True):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix, exit code 2, no traceback. (Unknown key,
# wrong type, heads, mesh, missing text corpus, schedule and another model's workdir are in
# tests/test_train_cli.py.)


@pytest.mark.parametrize(
    "overrides, devices, message",
    [
        (
            ["--config.data.seq_len=100"],
            1,
            "data.seq_len=100 is longer than model.max_len=32, the longest sequence the model "
            "takes; lower data.seq_len or raise model.max_len",
        ),
        (
            ["--config.train.batch_size=6"],
            4,
            "the micro-batch of 6 sequences does not split over mesh data x fsdp = 4 devices; "
            "make train.batch_size a multiple of 4",
        ),
        (
            ["--config.data.tokenizer=gpt2", "--config.data.gpt2_vocab=/nonexistent"],
            1,
            "data.gpt2_vocab='/nonexistent': tokenizer=gpt2 needs the directory holding GPT-2's "
            "vocab.json and merges.txt",
        ),
    ],
    ids=["seq_len_over_max_len", "batch_not_divisible_by_mesh", "missing_tokenizer_file"],
)
def test_bad_input_is_one_line_and_exit_code_2_before_compiling(
    tmp_path, overrides, devices, message
):
    proc = train(str(tmp_path / "bad"), *overrides, devices=devices)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_line(proc.stderr).startswith("train.py: error: ")
    assert message in last_line(proc.stderr), last_line(proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "workdir" not in proc.stdout  # failed before the model was built and compiled


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for the run's small files and about two checkpoints."""
    mount = tmp_path / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]
    found = shutil.which("mount")
    result = subprocess.run(command, capture_output=True, text=True) if found else None
    if result is None or result.returncode != 0:
        why = result.stderr.strip() if result else "no mount command"
        pytest.skip(
            f"cannot mount a tmpfs here (needs root: {why}); "
            "test_disk_full_error_names_the_step covers the message in-process"
        )
    yield str(mount)
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_during_a_save_is_one_line_then_resumes(uninterrupted, small_disk):
    workdir = os.path.join(small_disk, "run")
    proc = train(workdir, *RUN)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    found = re.fullmatch(
        r"train.py: error: disk full while saving the checkpoint at step (\d+) in \S+ \(the "
        r"checkpoint at step (\d+) is intact\); free space or choose another --workdir, then "
        r"run the same command to resume",
        line,
    )
    assert found, line
    assert "Traceback" not in proc.stderr
    failed, intact = int(found.group(1)), int(found.group(2))
    assert complete_steps(workdir)[-1] == intact == failed - 2
    assert not saves_in_progress(workdir)  # the half-written save was removed
    # More room, the same command: it resumes from the intact checkpoint and finishes.
    subprocess.run(["mount", "-o", "remount,size=8m", small_disk], check=True)
    proc = train(workdir, *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from the checkpoint at step {intact}\n" in proc.stdout
    assert_same_run(workdir, uninterrupted)


# ---------------------------------------------------------------------------------------------
# In-process pieces: the disk-full message without a small disk, metrics truncation, signals.


def test_disk_full_error_names_the_step(tmp_path, monkeypatch, capsys):
    import errno

    import jax.numpy as jnp

    from transformer.cli import entry as cli
    from transformer.store.checkpoint import CheckpointDiskFullError, Checkpoints

    checkpoints = Checkpoints(str(tmp_path / "checkpoints"))
    checkpoints.save(2, {"w": jnp.ones(3)})

    def full(*args, **kwargs):  # what Orbax raises on ENOSPC (a tensorstore error)
        raise ValueError(
            "RESOURCE_EXHAUSTED: Error writing ... Failed to write 123923 bytes: "
            "No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(checkpoints.manager, "save", full)
    with pytest.raises(CheckpointDiskFullError) as e:
        checkpoints.save(4, {"w": jnp.ones(3)})
    assert e.value.errno == errno.ENOSPC
    assert "at step 4" in str(e.value) and "step 2 is intact" in str(e.value)

    def main():
        raise e.value

    assert cli.run(main, program="train.py") == 2
    assert capsys.readouterr().err == f"train.py: error: {e.value.strerror}\n"
    checkpoints.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restore_latest_good_moves_damaged_steps_aside_only_when_one_reads(tmp_path):
    import jax
    import jax.numpy as jnp

    from transformer.store.checkpoint import CheckpointError, Checkpoints

    workdir = str(tmp_path)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
    for step in (2, 4, 6):
        checkpoints.save(step, {"w": jnp.full((64, 64), float(step))})
    abstract = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    for path in _array_files(workdir, 6):
        os.remove(path)
    step, state = checkpoints.restore_latest_good(abstract)
    assert step == 4 and float(state["w"][0, 0]) == 4.0
    assert complete_steps(workdir) == [2, 4]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6.damaged"))
    checkpoints.save(6, {"w": jnp.zeros((64, 64))})  # the step can be written again
    for step in (2, 4, 6):
        for path in _array_files(workdir, step):
            os.remove(path)
    with pytest.raises(CheckpointError, match=r"damaged steps: 6, 4, 2\)"):
        checkpoints.restore_latest_good(abstract)
    assert complete_steps(workdir) == [2, 4, 6]  # nothing moved when nothing could be read
    checkpoints.close()


def test_truncate_metrics_drops_steps_past_the_checkpoint_and_torn_lines(tmp_path):
    from transformer.store.rundir import RunDir

    truncate_metrics = RunDir(tmp_path).truncate_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 4, "train_loss": 1.5}\n{"step": 8, "train_loss": 1.25}\n'
        '{"step": 12, "train_loss": 1.0}\n{"step": 16, "trai'
    )
    assert truncate_metrics(8) == 2
    assert path.read_text() == '{"step": 4, "train_loss": 1.5}\n{"step": 8, "train_loss": 1.25}\n'
    assert truncate_metrics(8) == 0


def test_stop_signal_single_process_handles_both_signals_and_skips_preemption():
    from transformer.train.faults import StopSignal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGINT) == stop._handle
        assert stop.check_preemption(5) is False  # one process: no preemption service
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
