"""Server metrics in Prometheus' text exposition format (version 0.0.4), written by hand: a few gauges, counters
and two histograms need no client library.

Format: https://prometheus.io/docs/instrumenting/exposition_formats/ (``# HELP``/``# TYPE`` lines; a histogram is
cumulative ``_bucket{le="..."}`` counts ending with ``le="+Inf"``, then ``_sum`` and ``_count``).
"""

from __future__ import annotations

import threading
import time
from collections import deque

# Seconds; from 5 ms (a fast decode step) to a minute (a long queue).
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative-bucket histogram of observations (seconds), safe to update from any thread.

    Args:
        name: metric name (``diffllama_...``). help: its one-line description. buckets: increasing upper bounds.
    """

    def __init__(self, name: str, help: str, buckets=LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Count ``value`` (seconds) in the first bucket whose bound it does not exceed."""
        with self._lock:
            index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
            self.counts[index] += 1
            self.sum += value

    def render(self) -> list[str]:
        """The exposition lines of this histogram."""
        with self._lock:
            counts, total = list(self.counts), self.sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets + (float("inf"),), counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        lines += [f"{self.name}_sum {total}", f"{self.name}_count {running}"]
        return lines


class Throughput:
    """Tokens per second over the last ``window`` seconds, from a monotonically growing token count."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def rate(self, total: int) -> float:
        """Record ``total`` now; return the tokens per second since the oldest sample in the window."""
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, total))
            while len(self._samples) > 1 and now - self._samples[0][0] > self.window:
                self._samples.popleft()
            start, first = self._samples[0]
        return (total - first) / (now - start) if now > start else 0.0


class ServerMetrics:
    """What /metrics reports: the engine's queue and batch, token counts and rate, finished requests by reason,
    and histograms of time to first token and inter-token latency (fed by the engine's callbacks)."""

    def __init__(self) -> None:
        self.ttft = Histogram("diffllama_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first generated token.")
        self.itl = Histogram("diffllama_inter_token_latency_seconds",
                             "Seconds between consecutive generated tokens of a request.")
        self.throughput = Throughput()

    def render(self, stats) -> str:
        """Prometheus text of ``stats`` (an :class:`~diffllama.serve.engine.EngineStats`) and the histograms."""
        rate = self.throughput.rate(stats.generated_tokens)
        lines = []
        for kind, name, help, value in (
                ("gauge", "diffllama_queue_length", "Requests waiting for a cache slot.", stats.waiting),
                ("gauge", "diffllama_running_requests", "Requests holding a cache slot (prefill or decode).",
                 stats.running),
                ("gauge", "diffllama_generation_tokens_per_second",
                 "Generated tokens per second over the last 10 s (all requests).", rate),
                ("counter", "diffllama_prompt_tokens_total", "Prompt tokens prefilled.", stats.prompt_tokens),
                ("counter", "diffllama_generation_tokens_total", "Tokens generated.", stats.generated_tokens)):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP diffllama_requests_finished_total Requests ended, by finish reason.",
                  "# TYPE diffllama_requests_finished_total counter"]
        lines += [f'diffllama_requests_finished_total{{finish_reason="{reason}"}} {count}'
                  for reason, count in sorted(dict(stats.finished).items())]
        lines += self.ttft.render() + self.itl.render()
        return "\n".join(lines) + "\n"
