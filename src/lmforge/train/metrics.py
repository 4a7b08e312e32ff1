"""Training metrics: metrics.jsonl, TensorBoard, optional W&B, a live progress bar and a loss plot.

Only the main rank writes anything; on other ranks every method of :class:`MetricsLogger` does
nothing, so the loop can call it unconditionally.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Optional

from rich.console import Console

from lmforge.errors import DataError
from lmforge.io import atomic_path
from lmforge.parallel.runtime import Runtime

METRICS_NAME = "metrics.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"


def _number(value: Any) -> Any:
    """A metric value as plain JSON: tensors / numpy scalars become numbers, non-finite floats None."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # a tensor with several elements
            return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _format_eta(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(timedelta(seconds=int(round(max(seconds, 0.0)))))


def rate_label(unit: str) -> str:
    """How a throughput in ``unit`` per second is shown: ``tok/s`` for tokens, else ``examples/s``, ``pairs/s``,
    ``labels/s``, ``completions/s`` (what the stage's objective counts, as its ``UNIT_per_s`` metric)."""
    return "tok/s" if unit == "tokens" else f"{unit}/s"


def format_progress_line(step: int, total: int, loss: Optional[float] = None, lr: Optional[float] = None,
                         rate: Optional[float] = None, eta_s: Optional[float] = None, unit: str = "tokens") -> str:
    """``step 10/100 | loss 5.123 | lr 3.0e-04 | 12,345 tok/s | eta 0:01:20`` (absent fields left out); ``rate``
    counts ``unit`` per second (``pairs``: ``45 pairs/s``)."""
    parts = [f"step {step}/{total}"]
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if rate is not None:
        parts.append(f"{rate:,.0f} {rate_label(unit)}")
    parts.append(f"eta {_format_eta(eta_s)}")
    return " | ".join(parts)


def _wandb_credentials_present() -> bool:
    """True when W&B can run without prompting: an API key in the environment, offline mode, or a netrc login."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return bool(netrc.netrc(path).authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


class MetricsLogger:
    """Writes metrics to ``log_dir/metrics.jsonl``, TensorBoard and W&B, and shows progress.

    Args:
        log_dir: where ``metrics.jsonl`` and the TensorBoard event files go.
        runtime: only the main rank logs; on other ranks every method is a no-op.
        total_steps: the step count the progress bar runs to.
        tensorboard: write TensorBoard scalars with ``torch.utils.tensorboard.SummaryWriter``.
        wandb: ``wandb.init`` keyword arguments to log to W&B, or None. Used only when an API key is
            set (``WANDB_API_KEY``, a ``wandb login``, or ``WANDB_MODE=offline``); otherwise one warning.
        console: a ``rich.console.Console`` (default: a new one on stdout). On a terminal a live
            progress bar is drawn; otherwise (CI, Slurm logs) a plain line is printed instead.
        every_n_steps: on a non-terminal console, print a line when ``step % every_n_steps == 0``
            (and at the last step).

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, log_dir: str | os.PathLike, runtime: Runtime, total_steps: int, tensorboard: bool = True,
                 wandb: Optional[dict] = None, console: Optional[Console] = None, every_n_steps: int = 1):
        self.log_dir = Path(log_dir)
        self.runtime = runtime
        self.total_steps = int(total_steps)
        self.every_n_steps = max(1, int(every_n_steps))
        self.active = runtime.is_main
        self._file = None
        self._tb = None
        self._wandb_run = None
        self._progress = None
        self._task = None
        self._start: Optional[tuple[float, int]] = None  # (time, step) of the first update
        self._closed = False
        self.console = console
        if not self.active:
            return
        self.console = console if console is not None else Console()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / METRICS_NAME
        # A run killed mid-line leaves a partial last line: start ours on a fresh line.
        needs_newline = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._file = open(path, "a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")
            self._file.flush()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                self._warn(f"TensorBoard logging is off: {e}; pip install tensorboard")
            else:
                self._tb = SummaryWriter(log_dir=str(self.log_dir))
        if wandb is not None:
            self._start_wandb(dict(wandb))

    # -- helpers --------------------------------------------------------------------------------
    def _warn(self, message: str) -> None:
        self.console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)

    def _start_wandb(self, init_kwargs: dict) -> None:
        if not _wandb_credentials_present():
            self._warn("W&B logging is off: no WANDB_API_KEY and no `wandb login` found; "
                       "metrics still go to metrics.jsonl and TensorBoard")
            return
        try:
            import wandb  # noqa: PLC0415 - optional dependency
        except ImportError:
            self._warn("W&B logging is off: the wandb package is not installed (pip install wandb)")
            return
        try:
            init_kwargs.setdefault("dir", str(self.log_dir))
            self._wandb_run = wandb.init(**init_kwargs)
        except Exception as e:  # noqa: BLE001 - W&B trouble must never stop training
            self._warn(f"W&B logging is off: wandb.init failed ({e})")
            self._wandb_run = None

    @property
    def is_terminal(self) -> bool:
        return bool(self.console is not None and self.console.is_terminal)

    # -- logging --------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict) -> None:
        """Append ``{"step", "time", **metrics}`` to metrics.jsonl and send numbers to TensorBoard / W&B."""
        if not self.active or self._closed:
            return
        values = {str(k): _number(v) for k, v in metrics.items()}
        record = {"step": int(step), "time": time.time(), **values}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, int(step))
        if self._wandb_run is not None and numbers:
            try:
                self._wandb_run.log(numbers, step=int(step))
            except Exception as e:  # noqa: BLE001
                self._warn(f"W&B logging stopped: {e}")
                self._wandb_run = None

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Record a piece of text (a sample generation, the run config) in TensorBoard and W&B."""
        if not self.active or self._closed:
            return
        if self._tb is not None:
            self._tb.add_text(tag, text, int(step))
        if self._wandb_run is not None:
            try:
                self._wandb_run.log({tag: text}, step=int(step))
            except Exception as e:  # noqa: BLE001
                self._warn(f"W&B logging stopped: {e}")
                self._wandb_run = None

    # -- progress -------------------------------------------------------------------------------
    def _eta(self, step: int) -> Optional[float]:
        now = time.perf_counter()
        if self._start is None:
            self._start = (now, step)
            return None
        t0, s0 = self._start
        if step <= s0:
            return None
        return (self.total_steps - step) * (now - t0) / (step - s0)

    def update(self, step: int, loss: Optional[float] = None, lr: Optional[float] = None,
               rate: Optional[float] = None, unit: str = "tokens") -> None:
        """Move the progress display to ``step``: a live bar on a terminal, else a line every n steps. ``rate``:
        throughput in ``unit`` per second (tokens, or what the objective counts: examples, pairs, ...)."""
        if not self.active or self._closed:
            return
        loss, lr, rate = (_number(x) for x in (loss, lr, rate))
        eta = self._eta(step)
        if not self.is_terminal:
            if step % self.every_n_steps == 0 or step >= self.total_steps:
                line = format_progress_line(step, self.total_steps, loss, lr, rate, eta, unit)
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            return
        fields = {"loss": "-" if loss is None else f"{loss:.3f}", "lr": "-" if lr is None else f"{lr:.1e}",
                  "tps": "-" if rate is None else f"{rate:,.0f}", "unit": rate_label(unit), "eta": _format_eta(eta)}
        if self._progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[tps]} {task.fields[unit]}"), TimeElapsedColumn(),
                TextColumn("eta {task.fields[eta]}"),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total_steps, completed=step, **fields)
        else:
            self._progress.update(self._task, completed=step, **fields)

    # -- closing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the progress bar and close metrics.jsonl, TensorBoard and W&B (idempotent)."""
        if not self.active or self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wandb_run is not None:
            try:
                self._wandb_run.finish()
            except Exception as e:  # noqa: BLE001
                self._warn(f"W&B finish failed: {e}")

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file, in file order.

    Blank lines are skipped; lines that are not JSON objects (a run killed mid-write) are skipped
    with one warning. A missing file raises DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"metrics file {path} does not exist; it is written as <log_dir>/{METRICS_NAME} during training")
    records, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(lineno)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} malformed line(s) (first: line {bad[0]})", RuntimeWarning,
                      stacklevel=2)
    return records


def _series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``; a step logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for r in records:
        value, step = r.get(key), r.get("step")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and isinstance(step, int):
            by_step[step] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_loss_curve(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike,
                    keys: tuple[str, ...] = ("loss", "val_loss"), title: str = "Loss") -> Path:
    """Plot ``keys[0]`` (training loss) as a line and the other keys as points, against step.

    Uses a standalone ``matplotlib.figure.Figure`` with the Agg canvas, so the global pyplot backend
    is never touched. The PNG is written atomically.

    Returns:
        The PNG path. Raises DataError when the file has no value of any key.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_jsonl)
    series = {key: _series(records, key) for key in keys}
    if not any(steps for steps, _ in series.values()):
        raise DataError(f"metrics file {metrics_jsonl} has no values of {', '.join(keys)} to plot")
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, key in enumerate(keys):
        steps, values = series[key]
        if not steps:
            continue
        if i == 0:
            ax.plot(steps, values, linewidth=1.2, label=key)
        else:
            ax.plot(steps, values, marker="o", markersize=4, linewidth=0.8, linestyle="--", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def save_loss_curve(run_dir: str | os.PathLike, runtime: Optional[Runtime] = None, title: str = "Loss",
                    keys: tuple[str, ...] = ("loss", "val_loss")) -> Optional[Path]:
    """Draw a training run's loss curve: ``run_dir/loss_curve.png`` from ``run_dir/metrics.jsonl``.

    Every training stage (pretraining through the quickstart, fine-tuning, alignment) calls this once its loop
    has ended, stopped early included, so each run folder holds the curve next to its TensorBoard events.
    A resumed run redraws the whole curve (a step logged twice keeps its last value).

    Args:
        run_dir: the folder :class:`MetricsLogger` wrote ``metrics.jsonl`` into.
        runtime: only the main rank draws (None: this process is the main one).
        title: the plot's title, e.g. ``"lmforge finetune (lora): loss"``.
        keys: the training loss key (drawn as a line), then keys drawn as points.

    Returns:
        The PNG path; None on other ranks, or when the run logged no value of ``keys`` yet.
    """
    if runtime is not None and not runtime.is_main:
        return None
    run_dir = Path(run_dir)
    try:
        return plot_loss_curve(run_dir / METRICS_NAME, run_dir / LOSS_CURVE_NAME, keys=keys, title=title)
    except DataError:  # no metrics file, or no loss logged before the run stopped: nothing to draw
        return None
