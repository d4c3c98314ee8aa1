"""Two processes on this machine, joined by jax.distributed (gloo collectives on CPU)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import FAST_COMPILE_FLAGS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_compute_the_global_batch():
    worker = Path(__file__).with_name("_multihost_worker.py")
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, IB_LASSO_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", IB_LASSO_NUM_PROCESSES="2",
                   IB_LASSO_PROCESS_ID=str(pid), IB_LASSO_TEST_XLA_FLAGS=FAST_COMPILE_FLAGS)
        procs.append(subprocess.Popen([sys.executable, str(worker)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    w = rng.normal(size=(3,)).astype(np.float32)
    want_loss = float(np.mean((x @ w) ** 2))
    want_grad = 2 * x.T @ (x @ w) / len(x)
    assert sorted(o["process"] for o in outs) == [0, 1]
    for o in outs:
        assert o["processes"] == 2 and o["devices"] == 4 and o["local_devices"] == 2
        assert abs(o["loss"] - want_loss) < 1e-4 * max(1.0, want_loss)
        np.testing.assert_allclose(o["grad"], want_grad, rtol=1e-4, atol=1e-5)
