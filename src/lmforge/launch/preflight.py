"""Preflight: a short all-reduce across every rank before a multi-GPU stage, failing fast by node name.

Run one process per rank, under torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)
or under srun (``SLURM_PROCID``, ``SLURM_NTASKS``)::

    python -m lmforge.launch.preflight --store-host node1 --store-port 29501 --node-names node1,node2 --wait-seconds 60

1. Every rank writes its host name into a TCP store that rank 0 hosts.
2. Rank 0 waits up to ``--wait-seconds`` for all of them; ranks missing by then are named by the
   node they were meant to run on (``--node-names``, ranks laid out node by node), e.g.
   ``node gpu017 (ranks 4-7) did not answer within 60 s``.
3. All ranks all-reduce a one-element tensor (NCCL on GPUs, gloo on CPU) and check the sum.

Exit code 0 when every rank answered and the sum is right; 1 with a one-line message otherwise.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from datetime import timedelta
from typing import Optional, Sequence


class PreflightError(RuntimeError):
    """Some rank or node did not take part in the check."""


def _env_int(*names: str, default: Optional[int] = None) -> Optional[int]:
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return default


def missing_nodes(missing_ranks: Sequence[int], hosts: Sequence[str], world_size: int) -> str:
    """Describe the missing ranks by node: ``node b (ranks 2-3)``; ranks are laid out node by node."""
    if not hosts:
        return "ranks " + ", ".join(map(str, missing_ranks))
    per_node = max(world_size // len(hosts), 1)
    by_node: dict[str, list[int]] = {}
    for r in missing_ranks:
        by_node.setdefault(hosts[min(r // per_node, len(hosts) - 1)], []).append(r)
    parts = []
    for host, ranks in by_node.items():
        span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        parts.append(f"node {host} ({span})")
    return ", ".join(parts)


def check(rank: int, world_size: int, master: str, port: int, hosts: Sequence[str] = (), timeout: float = 60.0,
          backend: Optional[str] = None) -> dict:
    """Run the check as ``rank`` of ``world_size``; returns ``{"hosts": {rank: host}, "sum": world_size}`` on rank 0.

    Raises:
        PreflightError: a rank did not answer within ``timeout`` (named by its node) or the sum is wrong.
    """
    import torch
    import torch.distributed as dist

    me = socket.gethostname()
    deadline = time.monotonic() + timeout
    try:
        store = dist.TCPStore(master, port, world_size, is_master=(rank == 0), timeout=timedelta(seconds=timeout),
                              wait_for_workers=False)
    except Exception as e:  # the head node's store is unreachable
        raise PreflightError(f"preflight on {me} (rank {rank}): cannot reach rank 0's store at {master}:{port} "
                             f"within {timeout:.0f} s: {e}") from None
    store.set(f"preflight/host/{rank}", me)
    seen: dict[int, str] = {}
    if rank == 0:
        while time.monotonic() < deadline:
            for r in range(world_size):
                if r not in seen and store.check([f"preflight/host/{r}"]):
                    seen[r] = store.get(f"preflight/host/{r}").decode()
            if len(seen) == world_size:
                break
            time.sleep(0.1)
        missing = [r for r in range(world_size) if r not in seen]
        if missing:
            store.set("preflight/verdict", "fail")
            raise PreflightError(f"preflight: {missing_nodes(missing, hosts, world_size)} did not answer within "
                                 f"{timeout:.0f} s; check that node (sinfo -R, its log) or exclude it (--exclude)")
        store.set("preflight/verdict", "ok")
    else:
        store.wait(["preflight/verdict"], timedelta(seconds=max(deadline - time.monotonic(), 1.0) + 5))
        if store.get("preflight/verdict").decode() != "ok":
            raise PreflightError(f"preflight: rank 0 saw a node missing; rank {rank} on {me} stops")
    use_cuda = torch.cuda.is_available() and (backend in (None, "nccl"))
    backend = backend or ("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.PrefixStore("preflight/pg", store), rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    try:
        t = torch.ones(1, device=device)
        dist.all_reduce(t)
        if int(t.item()) != world_size:
            raise PreflightError(f"preflight: all-reduce gave {t.item()} instead of {world_size} on {me}")
    finally:
        dist.destroy_process_group()
    return {"hosts": seen, "sum": world_size}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m lmforge.launch.preflight``."""
    p = argparse.ArgumentParser(prog="python -m lmforge.launch.preflight", description=__doc__.splitlines()[0])
    # Option names no torchrun option starts with: torchrun would otherwise take them as its own abbreviations.
    p.add_argument("--store-host", default="127.0.0.1", help="host of rank 0 (it serves the TCP store)")
    p.add_argument("--store-port", type=int, default=29401, help="a free port on that host (not torchrun's)")
    p.add_argument("--node-names", default="", help="comma-separated node names, in rank order")
    p.add_argument("--wait-seconds", type=float, default=60.0)
    p.add_argument("--pg-backend", default=None, choices=["gloo", "nccl"])
    a = p.parse_args(argv)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    hosts = [h for h in a.node_names.split(",") if h]
    try:
        result = check(rank, world, a.store_host, a.store_port, hosts, a.wait_seconds, a.pg_backend)
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if rank == 0:
        print(f"preflight: all-reduce across {world} ranks on {len(set(result['hosts'].values()))} node(s) ok", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
