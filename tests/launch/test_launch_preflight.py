"""Preflight: the all-reduce check passes across real processes and names the node that never answers."""

from __future__ import annotations

import socket
import subprocess
import sys

from lmforge.launch.preflight import missing_nodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(rank: int, world: int, port: int, hosts: str, timeout: float) -> subprocess.Popen:
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmforge.launch.preflight", "--store-host=127.0.0.1", f"--store-port={port}",
                             f"--node-names={hosts}", f"--wait-seconds={timeout}", "--pg-backend=gloo"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_all_reduce_across_two_processes():
    port = _free_port()
    procs = [_spawn(r, 2, port, "nodeA", 30) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "all-reduce across 2 ranks on 1 node(s) ok" in outs[0][0]


def test_missing_node_is_named():
    # world of 4 ranks on nodeA, nodeB (2 each); only ranks 0 and 1 (nodeA) start
    port = _free_port()
    procs = [_spawn(r, 4, port, "nodeA,nodeB", 4) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert procs[0].returncode == 1
    assert "node nodeB (ranks 2-3) did not answer within 4 s" in outs[0][1]
    assert procs[1].returncode == 1  # the other ranks stop too instead of hanging


def test_missing_nodes_text():
    assert missing_nodes([5], ["a", "b"], 8) == "node b (rank 5)"
    assert missing_nodes([0, 1, 6, 7], ["a", "b", "c", "d"], 8) == "node a (ranks 0-1), node d (ranks 6-7)"
    assert missing_nodes([3], [], 4) == "ranks 3"
