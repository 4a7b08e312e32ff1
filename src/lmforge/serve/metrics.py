"""The engine's counters and latency histograms, and their Prometheus text (``GET /metrics``).

:class:`EngineMetrics` is updated by the engine's thread (plain integer and list updates); the server renders
it with the engine's numbers of the moment (:meth:`lmforge.serve.engine.Engine.stats`) in Prometheus' text
exposition format (version 0.0.4): counters end in ``_total``, histograms give cumulative ``_bucket{le=...}``
lines, ``_sum`` and ``_count``.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Optional

__all__ = ["EngineMetrics", "Histogram", "render_prometheus"]

#: Seconds to the first token.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
#: Seconds per output token after the first.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class Histogram:
    """Counts of observations at or below each bound (Prometheus' cumulative buckets, ``+Inf`` last)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        total = 0
        for bound, n in zip(list(self.bounds) + [float("inf")], self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        out += [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]
        return out


class EngineMetrics:
    """What the engine counts as it runs: tokens, finished requests by reason, preemptions, TTFT and TPOT."""

    def __init__(self):
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        # What the steps did (offline diagnostics: benchmarks/serve_load.py prints them): steps that launched a
        # decode step, those chained on the device after the one in flight, those that also prefilled (a mixed step
        # reads its decode step at once), prefill forwards and the tokens they fed, decode rows (one token each).
        self.decode_steps = 0
        self.chained_steps = 0
        self.mixed_steps = 0
        self.prefill_forwards = 0
        self.prefill_tokens = 0
        self.decode_rows = 0
        self.finished: dict[str, int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def observe(self, metrics, finish_reason: Optional[str]) -> None:
        """A request finished with ``metrics`` (:class:`~lmforge.serve.request.RequestMetrics`)."""
        reason = finish_reason or "unknown"
        self.finished[reason] = self.finished.get(reason, 0) + 1
        if metrics.ttft is not None:
            self.ttft.observe(metrics.ttft)
        if metrics.tpot is not None:
            self.tpot.observe(metrics.tpot)


def render_prometheus(metrics: EngineMetrics, stats: dict, model_name: str) -> str:
    """The Prometheus text of ``metrics`` and the engine's ``stats`` (gauges), every sample labelled with the
    served model's name."""
    label = model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    def sample(name: str, kind: str, help_text: str, value) -> list[str]:
        return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f'{name}{{model_name="{label}"}} {value}']

    lines: list[str] = []
    lines += sample("lmforge_requests_running", "gauge", "Requests decoding or prefilling.", stats["running"])
    lines += sample("lmforge_requests_waiting", "gauge", "Requests queued for admission.", stats["waiting"])
    lines += sample("lmforge_kv_blocks_used", "gauge", "KV-cache blocks referenced by requests.", stats["kv_blocks_used"])
    lines += sample("lmforge_kv_blocks_total", "gauge", "KV-cache blocks in all.", stats["kv_blocks_total"])
    lines += sample("lmforge_prompt_tokens_total", "counter", "Prompt tokens received.", metrics.prompt_tokens)
    lines += sample("lmforge_generation_tokens_total", "counter", "Tokens generated.", metrics.generation_tokens)
    lines += sample("lmforge_preemptions_total", "counter", "Requests sent back to the queue for lack of KV blocks.",
                    metrics.preemptions)
    lines += sample("lmforge_prefix_cache_queries_total", "counter", "Full blocks looked up in the prefix cache.",
                    stats["prefix_cache_queries"])
    lines += sample("lmforge_prefix_cache_hits_total", "counter", "Full blocks found in the prefix cache.",
                    stats["prefix_cache_hits"])
    lines += ["# HELP lmforge_requests_finished_total Requests finished, by reason.",
              "# TYPE lmforge_requests_finished_total counter"]
    for reason, n in sorted(metrics.finished.items()):
        lines.append(f'lmforge_requests_finished_total{{model_name="{label}",finish_reason="{reason}"}} {n}')
    for name, hist, text in (("lmforge_time_to_first_token_seconds", metrics.ttft, "Seconds from arrival to the first token."),
                             ("lmforge_time_per_output_token_seconds", metrics.tpot,
                              "Mean seconds per output token after the first, per request.")):
        lines += [line.replace(f"{name}_bucket{{", f'{name}_bucket{{model_name="{label}",')
                  .replace(f"{name}_sum ", f'{name}_sum{{model_name="{label}"}} ')
                  .replace(f"{name}_count ", f'{name}_count{{model_name="{label}"}} ')
                  for line in hist.lines(name, text)]
    return "\n".join(lines) + "\n"
