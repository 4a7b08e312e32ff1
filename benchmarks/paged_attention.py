"""The serving engine's paged decode attention alone, per tile choice (run by hand on a GPU; never by the test
suite).

:func:`lmforge.serve.kernels.paged_decode_attention` reads each row's keys and values through its block table,
``TILE`` cache positions per loop iteration of a program (:func:`lmforge.serve.kernels.paged_config`: one block
of 16 by default, or several blocks gathered together). For the decode shapes of Llama-3.1-8B (32 query / 8
key-value heads of 128) and Llama-3.2-1B (32 / 8 of 64), bf16, blocks of 16 positions scattered through the
cache, this times the whole op (the attention kernel and the combine of its splits) for each tile:

- ``*_b128``: 128 rows of lengths uniform in [64, 1500] (the serving benchmark's batch),
- ``*_b1_l4000``: one row of 4000, ``*_b8_l2000``, ``*_b16_l2000`` and ``*_b32_l2000``: mid batches of long rows
  (where the split heuristic, :func:`lmforge.serve.kernels.paged_splits`, shares each row over several programs;
  the sweep's splits say whether it should share them more),
- ``1b_r64_l128``, ``1b_r64_l256``, ``1b_r64_l384`` and ``1b_r256_l256`` (``--cases rollout``): a GRPO rollout's
  decode step (benchmarks/grpo_rollout.py: 8 prompts x 8 completions of 128 + 256 tokens; 256 rows: 32 prompts),
  every row at the same length (the rollout's rows advance together, from 129 to 384 positions), each row's table
  as wide as the engine makes it for ``max_seq_len`` 384 (24 blocks: the splits heuristic reads the width). At 64
  rows x 8 key/value heads the heuristic picks one split (512 programs fill an H100's 132 multiprocessors twice).

Each case is captured in a CUDA graph of 48 calls cycling through copies of the cache larger together than the
L2 cache (each layer of a decode step reads its own cache from device memory). GB/s counts the key and value
bytes the rows need (their lengths, not whole blocks); ``frac_of_copy`` divides it by the card's measured copy
bandwidth (a 1 GiB device-to-device copy, bytes read + written). Each variant's output is checked against the
float64 reference on the case's first rows (``max_err``, bf16: ``ok`` below 2e-2).

With ``--sweep``, each tile is also timed over warps and pipeline stages (at the heuristic's splits), then over
splits with its best warps and stages; ``best`` is the fastest launch found, ``sweep`` every timing. ``--splits
1,2,4`` (cheaper than a sweep) times each tile at those splits too, with its default warps and stages
(``by_splits``).

    python benchmarks/paged_attention.py [--cases 8b_b128,1b_b128,...|rollout] [--tiles 16,64,128] [--sweep]
                                         [--splits 1,2,4]
    python benchmarks/paged_attention.py --cases rollout --tiles 16,32,64,128 --splits 1,2,3,4,8 --sweep

Prints one JSON line per case and tile, and writes them all to $OUT/lmforge_paged_attention.json when OUT is set
(rewritten after each case).
"""

from __future__ import annotations

import argparse
import json
import os
import traceback

import torch

from lmforge.serve import kernels as K

BLOCK = 16
CASES = {  # name -> (query heads, key/value heads, head dim, rows, shortest, longest[, table positions])
    "8b_b128": (32, 8, 128, 128, 64, 1500),
    "1b_b128": (32, 8, 64, 128, 64, 1500),
    "8b_b1_l4000": (32, 8, 128, 1, 4000, 4000),
    "1b_b1_l4000": (32, 8, 64, 1, 4000, 4000),
    "8b_b16_l2000": (32, 8, 128, 16, 2000, 2000),
    "1b_b16_l2000": (32, 8, 64, 16, 2000, 2000),
    "8b_b8_l2000": (32, 8, 128, 8, 2000, 2000),
    "8b_b32_l2000": (32, 8, 128, 32, 2000, 2000),
    # a GRPO rollout's decode step: every row at one length, tables sized for max_seq_len 384 (128 + 256)
    "1b_r64_l128": (32, 8, 64, 64, 128, 128, 384),
    "1b_r64_l256": (32, 8, 64, 64, 256, 256, 384),
    "1b_r64_l384": (32, 8, 64, 64, 384, 384, 384),
    "1b_r256_l256": (32, 8, 64, 256, 256, 256, 384),
}
ALIASES = {"rollout": ["1b_r64_l128", "1b_r64_l256", "1b_r64_l384", "1b_r256_l256"]}
CHECKED_ROWS = 8  # rows checked against the float64 reference


def make_case(nh: int, nkv: int, hd: int, batch: int, shortest: int, longest: int, device: torch.device,
              dtype: torch.dtype = torch.bfloat16, min_bytes: int = 256 << 20, seed: int = 0, table: int = 0):
    """Queries, lengths and enough copies of a paged cache (each (k_cache, v_cache, block_tables), its blocks in a
    random order) to read ``min_bytes`` together (at most 16 copies); each row's table has room for ``table``
    positions (at least ``longest``). Returns (q, lengths, copies, bytes needed per call)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (batch,), generator=g)
    width = -(-max(longest, table) // BLOCK)  # the table's columns, as the engine sizes them for max_seq_len
    used = [-(-int(n) // BLOCK) for n in lengths]
    blocks = 1 + sum(used)  # block 0: the engine's scratch block
    itemsize = torch.tensor([], dtype=dtype).element_size()
    needed = int(lengths.sum()) * nkv * hd * 2 * itemsize  # keys and values of every visible position
    cache_bytes = 2 * blocks * BLOCK * nkv * hd * itemsize
    copies = []
    for _ in range(max(1, min(16, -(-min_bytes // cache_bytes)))):
        kc = torch.randn(blocks, BLOCK, nkv, hd, generator=g).to(device, dtype)
        vc = torch.randn(blocks, BLOCK, nkv, hd, generator=g).to(device, dtype)
        order = (torch.randperm(blocks - 1, generator=g) + 1).tolist()
        tables = torch.zeros(batch, width, dtype=torch.int32)
        for r, n in enumerate(used):
            tables[r, :n] = torch.tensor(order[:n], dtype=torch.int32)
            order = order[n:]
        copies.append((kc, vc, tables.to(device)))
    q = torch.randn(batch, nh, hd, generator=g).to(device, dtype)
    return q, lengths.to(device), copies, needed


def reference(q, lengths, copy) -> torch.Tensor:
    """The float64 reference of the first rows (:data:`CHECKED_ROWS`)."""
    kc, vc, tables = copy
    n = min(CHECKED_ROWS, q.shape[0])
    return K.paged_attention_reference(q[:n].double(), kc.double(), vc.double(), tables[:n], lengths[:n],
                                       q.shape[-1] ** -0.5)


def measure(time_us, q, lengths, copies, ref, needed: int, copy_gbs: float, cfg: dict, splits: int) -> dict:
    """Time one launch (``cfg``: TILE, num_warps, num_stages; ``splits``: 0 for the heuristic's) and check its
    first rows against ``ref``."""
    scale = q.shape[-1] ** -0.5

    def call(kc, vc, tables):
        return K._paged_attention(q, kc, vc, tables, lengths, scale, 0, splits, cfg)

    err = (call(*copies[0])[:ref.shape[0]].double() - ref).abs().max().item()
    us = time_us(call, copies)
    gbs = needed / us / 1e3
    return {"us": round(us, 2), "gbs": round(gbs), "frac_of_copy": round(gbs / copy_gbs, 3), "max_err": err,
            "ok": err < 2e-2}


def sweep_tile(measure_launch, tile: int, splits: int, most_splits: int) -> tuple:
    """Every warps x stages at the heuristic's ``splits``, then the splits up to ``most_splits`` with the best
    warps and stages. Returns (the fastest correct launch, every timing)."""
    timings = []

    def one(warps: int, stages: int, n_splits: int) -> None:
        cfg = {"TILE": tile, "num_warps": warps, "num_stages": stages}
        entry = {"num_warps": warps, "num_stages": stages, "splits": n_splits or splits}
        try:
            entry.update(measure_launch(cfg, n_splits))
        except Exception as e:  # noqa: BLE001 - e.g. more shared memory than the card has for this tile and stages
            entry["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        timings.append(entry)

    def fastest():
        ok = [t for t in timings if t.get("ok")]
        return min(ok, key=lambda t: t["us"]) if ok else None

    for warps in (2, 4, 8):
        for stages in (1, 2, 3, 4):
            one(warps, stages, 0)
    best = fastest()
    if best is not None:
        for s in (1, 2, 4, 8, 16, 32, 64):
            if s <= most_splits and s != splits:
                one(best["num_warps"], best["num_stages"], s)
    return fastest(), timings


def run_case(name: str, tiles: list, sweep: bool, time_us, copy_gbs: float, device: torch.device,
             dtype: torch.dtype = torch.bfloat16, splits_list: tuple = ()) -> list:
    """Every tile of case ``name`` (``time_us(fn, arg_tuples)``: the mean time of one call); one row a tile.
    ``splits_list``: splits each tile is also timed at, with its default warps and stages (``by_splits``)."""
    nh, nkv, hd, batch, shortest, longest, *table = CASES[name]
    q, lengths, copies, needed = make_case(nh, nkv, hd, batch, shortest, longest, device, dtype,
                                           table=table[0] if table else 0)
    ref = reference(q, lengths, copies[0])
    width = copies[0][2].shape[1]
    rows = []
    for tile in tiles:
        cfg = K.paged_config(BLOCK, hd, tile)
        splits = K.paged_splits(batch, nkv, width, device, tile // BLOCK)

        def measure_launch(c, n_splits):
            return measure(time_us, q, lengths, copies, ref, needed, copy_gbs, c, n_splits)
        row = {"case": name, "heads": nh, "kv_heads": nkv, "head_dim": hd, "batch": batch,
               "lengths": [shortest, longest], "mean_length": round(float(lengths.float().mean()), 1),
               "table_blocks": width,
               "copies": len(copies), "mbytes_per_call": round(needed / 1e6, 1), "tile": tile, "config": cfg,
               "splits": splits}
        try:
            row.update(measure_launch(cfg, 0))
        except Exception as e:  # noqa: BLE001 - reported in the row; the other tiles and cases still run
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if splits_list:
            row["by_splits"] = []
            for n_splits in splits_list:
                entry = {"splits": n_splits}
                try:
                    entry.update(measure_launch(cfg, n_splits))
                except Exception as e:  # noqa: BLE001 - reported; the other splits still run
                    entry["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                row["by_splits"].append(entry)
        if sweep:
            row["best"], row["sweep"] = sweep_tile(measure_launch, tile, splits, min(64, -(-width // (tile // BLOCK))))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def parse(argv=None) -> tuple:
    """The command line: (case names, tiles, sweep, splits), or one error line (exit code 2)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"any of {', '.join(CASES)}, or rollout (= {','.join(ALIASES['rollout'])})")
    ap.add_argument("--tiles", default="16,64,128", help="positions per loop iteration to time")
    ap.add_argument("--sweep", action="store_true", help="also sweep warps, stages and splits per tile")
    ap.add_argument("--splits", default="", help="also time each tile at these splits (programs per row and head; "
                                                 "1 to 64), e.g. 1,2,4")
    a = ap.parse_args(argv)
    cases = [c for name in a.cases.split(",") for c in ALIASES.get(name, [name])]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    tiles = _ints(ap, "--tiles", a.tiles)
    for t in tiles:
        try:
            K.paged_config(BLOCK, 64, t)
        except ValueError as e:
            ap.error(f"--tiles {t}: {e}")
    splits = _ints(ap, "--splits", a.splits) if a.splits else []
    bad = [s for s in splits if not 1 <= s <= 64]
    if bad:
        ap.error(f"--splits {bad[0]}: give splits from 1 to 64 (the combine kernel's most)")
    return cases, tiles, a.sweep, splits


def _ints(ap, flag: str, text: str) -> list:
    """A comma-separated list of integers, or one error line naming the flag."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        ap.error(f"{flag} {text}: give integers separated by commas, e.g. 1,2,4")


def run(cases: list, tiles: list, sweep: bool, splits: tuple = ()) -> list:
    from decode_kernels import graph_time_us
    from generate_throughput import copy_bandwidth

    device = torch.device("cuda")
    copy_gbs = copy_bandwidth(device) / 1e9
    header = {"device": torch.cuda.get_device_name(device), "copy_gbs": round(copy_gbs), "block_size": BLOCK,
              "dtype": "bfloat16", "default_tile": K.paged_config(BLOCK, 128)["TILE"]}
    print(json.dumps(header), flush=True)
    rows = [header]
    for name in cases:
        rows += run_case(name, tiles, sweep, graph_time_us, copy_gbs, device, splits_list=splits)
        torch.cuda.empty_cache()
        if os.environ.get("OUT"):  # after every case: a run cut short keeps what it measured
            with open(os.path.join(os.environ["OUT"], "lmforge_paged_attention.json"), "w") as f:
                json.dump(rows, f, indent=1)
    return rows


def main(argv=None) -> list:
    return run(*parse(argv))


if __name__ == "__main__":
    main()
