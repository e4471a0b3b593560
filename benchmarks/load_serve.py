"""Load test for `polymodal serve`: K concurrent streaming chat clients for M minutes, on loopback only.

    python benchmarks/load_serve.py                                   # the embedded SmolLM2, 4 clients, 2 minutes
    python benchmarks/load_serve.py --model ./my-llama --concurrency 8 --minutes 5 --max-tokens 64 --json
    python benchmarks/load_serve.py --compare-sequential              # also the same workload with --max-batch 1
    python benchmarks/load_serve.py --server http://127.0.0.1:8000 --server-pid 1234   # a server already running

It starts `polymodal serve` as a subprocess on a free loopback port (or uses `--server`), waits for /health, warms
up with one request per client, then runs K clients that each send streaming chat completions back to back
(prompts drawn from a fixed list with a seeded generator, greedy decoding, `stream_options.include_usage` for the
token counts) until M minutes are over; requests in flight at the deadline are allowed to finish.

Reported (a text table, or one JSON document with --json):
  requests completed, errors by kind (goal: none)
  time to first token (request sent -> first text chunk), p50 / p90 / p99
  decode tokens/s per request ((completion tokens - 1) / (last chunk - first text chunk)), p50 / p90
  aggregate tokens/s (completion tokens of all measured requests / measured wall time)
  server RSS (VmRSS of /proc/PID/status) after warm-up and at the end, and its drift in percent (goal: < 5%)
With --compare-sequential the same workload runs against a second server started with --max-batch 1, and the
ratio of aggregate tokens/s (batched / sequential) is the speed-up continuous batching gives.

Only loopback is ever contacted: any --host or --server host other than 127.0.0.1, localhost or ::1 is refused.
The exit status is 0 whenever the measurement ran (the numbers are the result, goals met or not), 2 for bad
arguments, 1 when the server could not be started or reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PROMPTS = (
    "Tell me a short story about a lighthouse keeper.",
    "What is the capital of France, and why is it famous?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn rain.",
    "Give three tips for learning a new language.",
    "How does a bicycle stay upright?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are prime numbers? Give a few examples.",
    "Describe the water cycle.",
    "List some healthy breakfast ideas.",
    "Why is the sky blue?",
    "Write a polite email declining a meeting invitation.",
)
DRIFT_GOAL_PERCENT = 5.0


class LoadError(RuntimeError):
    """The load test itself could not run (the server did not start, or could not be reached)."""


# ------------------------------------------------------------------------------------------------ one request
@dataclass
class Result:
    """One streaming request: times are seconds since it was sent; `error` is its kind when it failed."""

    error: str | None = None
    ttft: float | None = None  # first text chunk
    last: float | None = None  # last chunk before [DONE]
    completion_tokens: int = 0
    finished_at: float = 0.0  # time.monotonic() when it ended

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.error or self.ttft is None or self.completion_tokens < 2 or self.last <= self.ttft:
            return None
        return (self.completion_tokens - 1) / (self.last - self.ttft)


async def chat_once(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Result:
    """Send one streaming chat completion and time it chunk by chunk."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    res = Result()
    start = time.monotonic()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                res.error = f"http_{r.status_code}"
                return res
            done = saw_usage = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:  # an error after the status line: sent inside the stream
                    res.error = "stream_error"
                    return res
                now = time.monotonic() - start
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        res.ttft = now if res.ttft is None else res.ttft
                        res.last = now
                if chunk.get("usage"):
                    saw_usage = True
                    res.completion_tokens = int(chunk["usage"]["completion_tokens"])
            if not done:
                res.error = "stream_cut"  # the stream ended without `data: [DONE]`
            elif not saw_usage:
                res.error = "no_usage"  # include_usage was asked for: the token counts must come
    except httpx.TimeoutException:
        res.error = "timeout"
    except httpx.TransportError as e:
        res.error = f"transport_{type(e).__name__}"
    except (ValueError, KeyError, TypeError):
        res.error = "bad_chunk"
    finally:
        res.finished_at = time.monotonic()
    return res


# ------------------------------------------------------------------------------------------------ the workload
@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    warm_results: list[Result] = field(default_factory=list)
    measured_s: float = 0.0
    rss_warm_kib: int | None = None
    rss_end_kib: int | None = None


async def workload(base_url: str, model: str, *, concurrency: int, seconds: float, max_tokens: int, seed: int,
                   pid: int | None, request_timeout: float) -> Run:
    """Warm up (one request per client, all at once), read RSS, run the clients until `seconds` are over, read
    RSS again."""
    run = Run()
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=request_timeout, limits=limits,
                                 trust_env=False) as client:  # no proxies from the environment: loopback only
        warm = random.Random(seed - 1)
        run.warm_results = list(await asyncio.gather(*(chat_once(client, model, warm.choice(PROMPTS), max_tokens)
                                                       for _ in range(concurrency))))
        run.rss_warm_kib = rss_kib(pid)
        start = time.monotonic()
        deadline = start + seconds

        async def client_loop(i: int) -> None:
            rng = random.Random(seed * 1000 + i)  # each client its own seeded stream of prompts
            while time.monotonic() < deadline:
                run.results.append(await chat_once(client, model, rng.choice(PROMPTS), max_tokens))

        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        run.measured_s = max((r.finished_at for r in run.results), default=time.monotonic()) - start
        run.rss_end_kib = rss_kib(pid)
    return run


def rss_kib(pid: int | None) -> int | None:
    """The process's resident set size (VmRSS) in KiB, or None without a PID to read."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(run: Run, *, concurrency: int, max_tokens: int) -> dict:
    ok = [r for r in run.results if r.error is None]
    errors: dict[str, int] = {}
    for r in run.results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    ttft = [r.ttft for r in ok if r.ttft is not None]  # an answer that is only end-of-sequence has no text
    decode = [v for v in (r.decode_tokens_per_s for r in ok) if v is not None]
    tokens = sum(r.completion_tokens for r in ok)
    drift = (None if not run.rss_warm_kib or run.rss_end_kib is None
             else 100.0 * (run.rss_end_kib - run.rss_warm_kib) / run.rss_warm_kib)
    warm_errors = sum(r.error is not None for r in run.warm_results)
    return {
        "concurrency": concurrency, "max_tokens": max_tokens, "measured_s": round(run.measured_s, 2),
        "requests_completed": len(ok), "requests_failed": len(run.results) - len(ok), "errors": errors,
        "warmup_errors": warm_errors, "empty_answers": sum(r.ttft is None for r in ok), "completion_tokens": tokens,
        "ttft_s": {"p50": percentile(ttft, 50), "p90": percentile(ttft, 90), "p99": percentile(ttft, 99)},
        "decode_tokens_per_s": {"p50": percentile(decode, 50), "p90": percentile(decode, 90)},
        "aggregate_tokens_per_s": tokens / run.measured_s if run.measured_s > 0 else None,
        "rss_mib": {"after_warmup": None if run.rss_warm_kib is None else run.rss_warm_kib / 1024,
                    "end": None if run.rss_end_kib is None else run.rss_end_kib / 1024},
        "rss_drift_percent": drift,
        "goals": {"no_errors": not errors and warm_errors == 0,
                  "rss_drift_below_5_percent": None if drift is None else drift < DRIFT_GOAL_PERCENT},
    }


# ------------------------------------------------------------------------------------------------ the server
class Server:
    """`polymodal serve` in a subprocess on a free loopback port; its output goes to a log file."""

    def __init__(self, model: str | None, host: str, max_batch: int, concurrency: int, startup_timeout: float):
        self.host = host
        self.port = free_port(host)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="load_serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "polymodal.cli", "serve", "--host", host, "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-queue", str(max(32, 2 * concurrency))]
        if model:
            cmd += ["--model", model]
        env = {**os.environ, "POLYMODAL_API_KEY": ""}  # an open server: it listens on loopback only
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            self.model_id = wait_for_health(self.url, startup_timeout, self.proc, self.log.name)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_health(url: str, timeout: float, proc: subprocess.Popen | None = None, log: str | None = None) -> str:
    """Poll GET /health until it answers 200; return the first served model id."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=5, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                tail = Path(log).read_text()[-2000:] if log else ""
                raise LoadError(f"the server exited with status {proc.returncode} before answering /health:\n{tail}")
            try:
                r = client.get("/health")
                if r.status_code == 200:
                    models = r.json().get("models") or []
                    if not models:
                        raise LoadError(f"{url} serves no models")
                    return models[0]
                if r.status_code == 401:
                    raise LoadError(f"{url}/health needs an API key; this script talks to open servers only")
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise LoadError(f"the server at {url} did not answer /health within {timeout:.0f} s")


def is_loopback(host: str | None) -> bool:
    return (host or "").lower().strip("[]") in LOOPBACK


# ------------------------------------------------------------------------------------------------ reporting
def _fmt(v, spec=".3f", unit="") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def format_report(report: dict) -> str:
    rows = [("requests completed", str(report["requests_completed"])),
            ("errors", ", ".join(f"{k}: {v}" for k, v in report["errors"].items()) or "none"),
            ("warm-up errors", str(report["warmup_errors"])),
            ("answers without text", str(report["empty_answers"])),
            ("completion tokens", str(report["completion_tokens"])),
            ("measured", f"{report['measured_s']:.1f} s")]
    t, d = report["ttft_s"], report["decode_tokens_per_s"]
    rows += [("TTFT p50 / p90 / p99", f"{_fmt(t['p50'])} / {_fmt(t['p90'])} / {_fmt(t['p99'])} s"),
             ("decode tok/s per request p50 / p90", f"{_fmt(d['p50'], '.1f')} / {_fmt(d['p90'], '.1f')}"),
             ("aggregate tok/s", _fmt(report["aggregate_tokens_per_s"], ".1f")),
             ("server RSS after warm-up / end", f"{_fmt(report['rss_mib']['after_warmup'], '.1f')} / "
                                                f"{_fmt(report['rss_mib']['end'], '.1f')} MiB"),
             ("RSS drift", _fmt(report["rss_drift_percent"], "+.2f", " %"))]
    g = report["goals"]
    verdict = {True: "met", False: "MISSED", None: "n/a (no server PID)"}
    rows.append(("goals", f"0 errors: {verdict[g['no_errors']]}; RSS drift < 5 %: "
                          f"{verdict[g['rss_drift_below_5_percent']]}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, metavar="SPEC", help="what the started server serves (its --model; "
                   "default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--server", default=None, metavar="URL", help="use this already running loopback server")
    p.add_argument("--server-pid", type=int, default=None, help="with --server: its PID, for the RSS readings")
    p.add_argument("--host", default="127.0.0.1", help="where the started server listens (loopback only)")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent streaming clients")
    p.add_argument("--minutes", type=float, default=2.0, help="measured duration (after warm-up)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--max-batch", type=int, default=8, help="the started server's --max-batch")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompt choice")
    p.add_argument("--compare-sequential", action="store_true",
                   help="also run the same workload against a server with --max-batch 1 (not with --server)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request counts as timeout")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for /health")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    return p


def measure(args, *, max_batch: int) -> dict:
    """Start a server (unless --server), run the workload against it, and summarize."""
    server = None
    try:
        if args.server:
            url, pid = args.server.rstrip("/"), args.server_pid
            model = wait_for_health(url, args.startup_timeout)
        else:
            server = Server(args.model, args.host, max_batch, args.concurrency, args.startup_timeout)
            url, pid, model = server.url, server.proc.pid, server.model_id
        run = asyncio.run(workload(url, model, concurrency=args.concurrency, seconds=args.minutes * 60,
                                   max_tokens=args.max_tokens, seed=args.seed, pid=pid,
                                   request_timeout=args.request_timeout))
    finally:
        if server is not None:
            server.close()
    report = summarize(run, concurrency=args.concurrency, max_tokens=args.max_tokens)
    report.update(model=model, server=url, max_batch=None if args.server else max_batch)
    return report


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.server:
        parts = urlsplit(args.server)
        if parts.scheme != "http" or not is_loopback(parts.hostname):
            print(f"error: --server {args.server!r} is not a loopback http URL: this script only talks to "
                  f"127.0.0.1, localhost or ::1", file=sys.stderr)
            return 2
        if args.compare_sequential:
            print("error: --compare-sequential starts its own servers; drop --server", file=sys.stderr)
            return 2
    if not is_loopback(args.host):
        print(f"error: --host {args.host!r} is not a loopback address: the load test only runs against "
              f"127.0.0.1, localhost or ::1", file=sys.stderr)
        return 2
    if args.concurrency < 1 or args.minutes <= 0 or args.max_tokens < 1 or args.max_batch < 1:
        print("error: --concurrency, --minutes, --max-tokens and --max-batch must be positive", file=sys.stderr)
        return 2
    try:
        report = measure(args, max_batch=args.max_batch)
        if args.compare_sequential:
            sequential = measure(args, max_batch=1)
            a, b = report["aggregate_tokens_per_s"], sequential["aggregate_tokens_per_s"]
            report["sequential"] = sequential
            report["batching_speedup"] = a / b if a and b else None
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {report['model']} at {report['server']}, max_batch {report['max_batch']}, concurrency "
          f"{args.concurrency}, max_tokens {args.max_tokens}, {args.minutes:g} min")
    print(format_report(report))
    if args.compare_sequential:
        print(f"\nsame workload, --max-batch 1:\n{format_report(report['sequential'])}")
        print(f"\nbatching speed-up (aggregate tok/s, max_batch {args.max_batch} / 1): "
              f"{_fmt(report['batching_speedup'], '.2f', 'x')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
