"""Online serving, end to end in one command: a random-weight checkpoint, ``lmforge serve`` on it, Poisson load,
shutdown (issue 17's online target: p99 TTFT under 1 s at 16 requests/s on the Llama-3.1-8B shape). Not a test.

1. Writes a checkpoint of a named shape (``benchmarks/serve_load.py``'s ``SHAPES``; random weights in bf16 on a GPU,
   fp32 on a CPU) into a temporary folder in lmforge's own format (:func:`lmforge.train.checkpoint.save_model`:
   safetensors shards, checksums), with a word-level tokenizer built here: one id per word ``w<i>`` for every id of
   the model's vocabulary (``</s>`` is id 1, the end of text), so every token the model emits decodes to text and
   streams as its own chunk. Nothing is downloaded. On a GPU this runs in a child process, whose memory is all given
   back before the server starts.
2. Starts ``python -m lmforge serve CKPT --compile`` (``--compile`` on a GPU; ``--max-batch-size``,
   ``--max-seq-len`` = longest prompt + output, ``--max-pending`` = all requests) on a free port, and records the
   server's start-up time: from starting the process to its first healthy ``/health`` answer (the weights read and
   checked, the KV cache sized, every CUDA graph captured).
3. Runs ``serve_load.py``'s online mode against it (imported): ``--num-requests`` streamed completions of random
   token-id prompts with Poisson arrivals at ``--rate``, prompts and outputs of uniform lengths (the issue's workload:
   64-1024 and 32-512 tokens), greedy, end of text ignored: output tokens/s, TTFT and TPOT p50/p99, refused requests.
4. Stops the server with SIGINT (uvicorn's graceful shutdown) and records whether it exited cleanly.

    PYTHONPATH=src python3 benchmarks/serve_online.py                        # llama3.1/8b, 16/s, 512 requests (GPU)
    PYTHONPATH=src python3 benchmarks/serve_online.py --shape tiny --device cpu --num-requests 8 --rate 4   # CPU

The server's own output goes to ``$OUT/serve_online_server.log``. Prints one JSON line and appends it to
``$OUT/serve_online.json`` when OUT is set. Exit status 1 when the server did not start, a request failed or the
server did not stop cleanly.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (benchmarks/serve_load.py: shapes, workload, online mode)

#: Prompt and output length ranges of each shape (the issue's workload; the tiny shape's context is 512).
WORKLOADS = {"tiny": ((8, 64), (4, 32))}
ISSUE_WORKLOAD = ((64, 1024), (32, 512))
EOS = "</s>"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(serve_load.SHAPES), default="llama3.1/8b")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is one")
    p.add_argument("--rate", type=float, default=16.0, help="requests per second (Poisson arrivals)")
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--prompt-len", type=int, nargs=2, default=None, metavar=("A", "B"),
                   help="prompt tokens, uniform in [A, B] (default 64 1024; tiny: 8 64)")
    p.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("C", "D"),
                   help="output tokens, uniform in [C, D] (default 32 512; tiny: 4 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--no-compile", action="store_true", help="serve without --compile on a GPU")
    p.add_argument("--startup-timeout", type=float, default=480.0, help="seconds to wait for the server's /health")
    p.add_argument("--tag", default="", help="a label copied into the record")
    a = p.parse_args(argv)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt, output = WORKLOADS.get(a.shape, ISSUE_WORKLOAD)
    a.prompt_len, a.output_len = a.prompt_len or list(prompt), a.output_len or list(output)
    context = serve_load.SHAPES[a.shape]["max_position_embeddings"]
    if a.prompt_len[1] + a.output_len[1] > context:
        p.error(f"the longest prompt + output ({a.prompt_len[1] + a.output_len[1]}) exceeds the {a.shape} shape's "
                f"context of {context} positions; lower --prompt-len / --output-len")
    if a.num_requests < 1 or a.rate <= 0:
        p.error("--num-requests must be at least 1 and --rate above 0")
    return a


# -- 1. the checkpoint ----------------------------------------------------------------------------------------------

def word_tokenizer(vocab_size: int):
    """An lmforge :class:`~lmforge.data.tokenizers.Tokenizer` with one word per id: ``<unk>`` 0, ``</s>`` 1 (end of
    text), ``w2`` ... ``w<vocab_size - 1>``, split on whitespace; decoding joins the words with spaces."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from lmforge.data.tokenizers import Tokenizer

    vocab = {"<unk>": 0, EOS: 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<unk>", EOS])
    return Tokenizer(backend, {"eos_token": EOS, "unk_token": "<unk>"})


def write_checkpoint(shape: str, device: str, folder: str) -> None:
    """Random weights of ``shape`` (made on ``device`` in its serving dtype) and the word tokenizer, saved as an
    lmforge checkpoint in ``folder``."""
    import torch

    from lmforge.train.assembly import saved_state_dict
    from lmforge.train.checkpoint import save_model

    model = serve_load.build_model(shape, device, torch.bfloat16 if device == "cuda" else torch.float32)
    save_model(folder, saved_state_dict(model), model.cfg.to_dict(), tokenizer=word_tokenizer(model.cfg.vocab_size))
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    (Path(folder).parent / "card.txt").write_text(card)  # read by the parent, which never touches the GPU


def make_checkpoint(a, folder: Path) -> float:
    """Write the checkpoint (on a GPU in a child process, so none of its memory stays taken); the seconds it took."""
    t0 = time.perf_counter()
    if a.device == "cuda":
        proc = multiprocessing.get_context("spawn").Process(target=write_checkpoint,
                                                            args=(a.shape, a.device, str(folder)))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"writing the checkpoint failed (exit {proc.exitcode})")
    else:
        write_checkpoint(a.shape, a.device, str(folder))
    return time.perf_counter() - t0


# -- 2. and 4. the server ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(a, folder: Path, port: int, log) -> tuple[subprocess.Popen, float]:
    """``lmforge serve`` on ``folder``; returns the process and its start-up seconds (to the first healthy answer)."""
    import httpx

    cmd = [sys.executable, "-m", "lmforge", "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
           "--model-name", "bench", "--device", a.device, "--max-batch-size", str(a.max_batch_size),
           "--max-seq-len", str(a.prompt_len[1] + a.output_len[1]), "--max-pending", str(a.num_requests),
           "--max-num-batched-tokens", str(a.max_num_batched_tokens),
           "--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    if a.device == "cuda" and not a.no_compile:
        cmd.append("--compile")
    print("starting: " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was healthy (see its log)")
        if time.perf_counter() - t0 > a.startup_timeout:
            stop_server(proc)
            raise RuntimeError(f"the server was not healthy within {a.startup_timeout:.0f} s (see its log)")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0, trust_env=False).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)


def stop_server(proc: subprocess.Popen, grace: float = 60.0) -> dict:
    """SIGINT (graceful), then SIGTERM and SIGKILL if it does not exit in time."""
    t0 = time.perf_counter()
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig != signal.SIGINT:
            return dict(server_exit_code=proc.returncode, stopped_cleanly=False,
                        stop_seconds=round(time.perf_counter() - t0, 1))
    return dict(server_exit_code=proc.returncode, stopped_cleanly=proc.returncode == 0,
                stop_seconds=round(time.perf_counter() - t0, 1))


# -- all of it -------------------------------------------------------------------------------------------------------

def run(a, out: Path | None) -> dict:
    """Steps 1-4; the record (with ``error`` when a step failed)."""
    cfg = serve_load.SHAPES[a.shape]
    rec = dict(case="serve_online", shape=a.shape, card=None, device=a.device, rate=a.rate,
               num_requests=a.num_requests, prompt_len=a.prompt_len, output_len=a.output_len,
               max_batch_size=a.max_batch_size, compile=a.device == "cuda" and not a.no_compile,
               tokenizer=f"word-level, {cfg['vocab_size']} ids (the model's vocabulary)", tag=a.tag)
    log_path = (out or Path(tempfile.gettempdir())) / "serve_online_server.log"
    rec["server_log"] = str(log_path)
    with tempfile.TemporaryDirectory(prefix="serve_online_") as tmp, open(log_path, "w") as log:
        folder = Path(tmp) / a.shape.replace("/", "-")
        rec["checkpoint_write_seconds"] = round(make_checkpoint(a, folder), 1)
        rec["card"] = (Path(tmp) / "card.txt").read_text()
        rec["checkpoint_gib"] = round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30, 2)
        print(f"checkpoint {folder}: {rec['checkpoint_gib']} GiB in {rec['checkpoint_write_seconds']} s", flush=True)
        port = free_port()
        try:
            proc, startup = start_server(a, folder, port, log)
        except RuntimeError as e:
            rec["error"] = str(e)
            log.flush()
            sys.stderr.write("".join(log_path.read_text(errors="replace").splitlines(True)[-40:]))
            return rec
        rec["server_startup_seconds"] = round(startup, 1)
        log.flush()  # the engine's own start-up lines (KV cache size, graph capture time), uvicorn's left out
        rec["server_startup_lines"] = [ln for ln in log_path.read_text(errors="replace").splitlines()
                                       if ln.strip() and not ln.startswith("INFO:")][-12:]
        print(f"server healthy after {startup:.1f} s", flush=True)
        try:
            load = serve_load.parse_args([
                "--url", f"http://127.0.0.1:{port}/v1", "--model", "bench", "--rate", str(a.rate),
                "--num-requests", str(a.num_requests), "--seed", str(a.seed), "--vocab-size", str(cfg["vocab_size"]),
                "--prompt-len", *map(str, a.prompt_len), "--output-len", *map(str, a.output_len)])
            row = serve_load.online(load)[0]
            rec.update({k: v for k, v in row.items() if k != "pass"})
            rec["target_ttft_p99_under_1s"] = rec["ttft_p99"] < 1.0
        except Exception as e:  # noqa: BLE001 - the server is stopped and the error recorded
            rec["error"] = f"load: {type(e).__name__}: {e}"[:400]
        finally:
            rec.update(stop_server(proc))
    return rec


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    rec = run(a, out)
    print(json.dumps(rec), flush=True)
    if out is not None:
        path = out / "serve_online.json"
        results = json.loads(path.read_text()) if path.exists() else []  # one device call's invocations share it
        results.append(rec)
        path.write_text(json.dumps(results, indent=1))
    ok = "error" not in rec and rec.get("failed") == 0 and rec.get("stopped_cleanly")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
