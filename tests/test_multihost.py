"""Multi-host for real: two local processes with two CPU devices each, joined by
`jax.distributed.initialize` on 127.0.0.1 with gloo collectives, train, stop, resume, and log
the same losses as one process with four devices. Also: restore on a different mesh."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, device_env, read_metrics, run_python

COMMON = [
    "--config=configs/tiny.py",
    "--config.train.num_steps=12",
    "--config.checkpoint.every_steps=6",
    "--config.train.log_every_steps=3",
    "--config.train.eval_every_steps=6",
    "--config.train.sample_tokens=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_single(workdir, *extra, devices=4):
    return run_python(
        "train.py", f"--workdir={workdir}", *COMMON, *extra, devices=devices, check=True
    )


def run_two_processes(workdir, *extra):
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                f"--workdir={workdir}",
                *COMMON,
                *extra,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=device_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outputs


def losses(workdir):
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(workdir)]


def assert_same_losses(a, b):
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (_, la, va), (_, lb, vb) in zip(a, b, strict=True):
        np.testing.assert_allclose(la, lb, atol=1e-5)
        assert (va is None) == (vb is None)
        if va is not None:
            np.testing.assert_allclose(va, vb, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("single4"))
    run_single(workdir)
    return losses(workdir)


def test_two_processes_train_stop_resume_like_one_process(reference, tmp_path):
    workdir = str(tmp_path / "two_hosts")
    run_two_processes(workdir, "--config.train.stop_at_step=6")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]
    run_two_processes(workdir)  # both restart and resume from step 6
    assert_same_losses(losses(workdir), reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh, devices",
    [
        (["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"], 4),
        (["--config.mesh.data=1"], 1),
    ],
)
def test_restore_on_a_different_mesh_continues_with_the_same_losses(
    reference, tmp_path, mesh, devices
):
    workdir = str(tmp_path / "switch")
    run_single(workdir, "--config.train.stop_at_step=6", devices=8)  # saved with data=8
    run_single(workdir, *mesh, devices=devices)
    assert_same_losses(losses(workdir), reference)
