"""What an operator reads off a running server: one access-log line per API request (and per
request the HTTP guard refused), and counters and histograms in Prometheus's text format (GET
/metrics). Plain bookkeeping, no HTTP and no dependency; the server calls it from its event
loop only."""

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, TextIO, Tuple

# Upper bounds (seconds) of the histograms' buckets: a first token takes a prefill (ms to
# seconds), a next one a decode step (ms to a few hundred ms on a CPU).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CLIENT_GONE = 499  # the access log's status of a request whose client left (nginx's)
OTHER_ROUTE = "other"  # the metrics' route of a path the server has no route for


class Histogram:
    def __init__(self, bounds: Tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound),
                     len(self.bounds))
        self.counts[index] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str) -> List[str]:
        out, running = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


@dataclass
class Record:
    """One API request, from its arrival to its last byte."""
    route: str
    started: float
    method: str = "POST"
    id: str = "-"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: Optional[float] = None
    last_token: Dict[int, float] = field(default_factory=dict)  # choice -> time
    done: bool = False


class Metrics:
    def __init__(self, load: Callable[[], Dict[str, int]], log: TextIO = sys.stderr,
                 clock: Callable[[], float] = time.monotonic):
        self.load, self.log, self.clock = load, log, clock
        self.requests: Dict[Tuple[str, int], int] = {}
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.inter_token = Histogram(INTER_TOKEN_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)
        # the server's routes (None: any path): other paths are counted as OTHER_ROUTE, so
        # that clients asking for made-up paths cannot add series without end
        self.routes: Optional[Set[str]] = None

    def begin(self, route: str, method: str = "POST") -> Record:
        return Record(route=route, started=self.clock(), method=method)

    def tokens(self, record: Record, choice: int, count: int) -> None:
        """`count` new tokens of a choice have just been sent."""
        if count <= 0:
            return
        now = self.clock()
        if record.first_token is None:
            record.first_token = now
            self.ttft.observe(now - record.started)
        previous = record.last_token.get(choice)
        if previous is not None:  # tokens held back together share the gap
            self.inter_token.observe((now - previous) / count, count)
        elif count > 1:
            self.inter_token.observe(0.0, count - 1)
        record.last_token[choice] = now

    def finish(self, record: Record, status: int) -> None:
        """The request is over (answered, refused or abandoned): count it and log its line,
        once."""
        if record.done:
            return
        record.done = True
        total = self.clock() - record.started
        known = self.routes is None or record.route in self.routes
        key = (record.route if known else OTHER_ROUTE, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.duration.observe(total)
        ttft = ("-" if record.first_token is None
                else f"{record.first_token - record.started:.3f}s")
        print(f"request {record.id} {record.method} {record.route[:200]} {status} "
              f"prompt_tokens={record.prompt_tokens} "
              f"completion_tokens={record.completion_tokens} ttft={ttft} total={total:.3f}s",
              file=self.log, flush=True)

    def render(self) -> str:
        """Prometheus's text exposition format (version 0.0.4)."""
        load = self.load()
        lines = ["# HELP llama_requests_total API requests answered or refused, by route and "
                 "status.",
                 "# TYPE llama_requests_total counter"]
        lines += [f'llama_requests_total{{route="{route}",status="{status}"}} {count}'
                  for (route, status), count in sorted(self.requests.items())]
        for name, value, help_text in (
                ("llama_prompt_tokens_total", self.prompt_tokens, "Prompt tokens read."),
                ("llama_completion_tokens_total", self.completion_tokens,
                 "Tokens generated.")):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter",
                      f"{name} {value}"]
        for name, key, help_text in (
                ("llama_requests_waiting", "waiting", "Requests queued for a slot."),
                ("llama_requests_running", "running", "Requests in the batch."),
                ("llama_slots", "slots", "Requests the batch can hold (--max_batch_size).")):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
                      f"{name} {load[key]}"]
        for name, histogram, help_text in (
                ("llama_time_to_first_token_seconds", self.ttft,
                 "From a request's arrival to its first token."),
                ("llama_inter_token_seconds", self.inter_token,
                 "Between two tokens of a choice, as sent."),
                ("llama_request_duration_seconds", self.duration,
                 "From a request's arrival to its end.")):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
            lines += histogram.lines(name)
        return "\n".join(lines) + "\n"
