"""benchmarks/load_serve.py: a few seconds of load against `polymodal serve` (a real subprocess) serving a tiny
random Llama, 4 concurrent streaming clients; the report has no errors, positive latencies and speeds, and RSS
readings. Non-loopback hosts and servers are refused before anything starts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from serve_helpers import save_tiny_chat_llama

transformers = pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "load_serve.py"


@pytest.fixture(scope="module")
def load_serve():
    spec = importlib.util.spec_from_file_location("load_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_serve"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("load_serve", None)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer and a ChatML template, saved by transformers."""
    corpus = ["Tell me a short story about a lighthouse keeper.", "Why is the sky blue? Describe the water cycle."]
    return save_tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat"), corpus * 20)


def test_load_report(load_serve, llama_dir, capsys):
    rc = load_serve.main(["--model", f"tiny={llama_dir}", "--concurrency", "4", "--minutes", "0.08",
                          "--max-tokens", "16", "--json", "--startup-timeout", "60"])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads(out)
    assert report["model"] == "tiny" and report["concurrency"] == 4 and report["max_batch"] == 8
    assert report["errors"] == {} and report["warmup_errors"] == 0 and report["goals"]["no_errors"] is True
    assert report["requests_completed"] >= 4  # at least one round of the 4 clients in ~5 s
    assert report["completion_tokens"] > 0 and report["aggregate_tokens_per_s"] > 0
    assert 0 < report["ttft_s"]["p50"] <= report["ttft_s"]["p90"] <= report["ttft_s"]["p99"]
    assert 0 < report["decode_tokens_per_s"]["p50"] <= report["decode_tokens_per_s"]["p90"]
    assert report["rss_mib"]["after_warmup"] > 0 and report["rss_mib"]["end"] > 0
    assert isinstance(report["rss_drift_percent"], float)
    assert isinstance(report["goals"]["rss_drift_below_5_percent"], bool)


def test_text_table(load_serve):
    run = load_serve.Run(results=[load_serve.Result(ttft=0.1, last=0.5, completion_tokens=5, finished_at=1.0),
                                  load_serve.Result(error="http_429", finished_at=1.0)],
                         measured_s=2.0, rss_warm_kib=1000, rss_end_kib=1100)
    report = load_serve.summarize(run, concurrency=2, max_tokens=8)
    assert report["errors"] == {"http_429": 1} and report["requests_completed"] == 1
    assert report["decode_tokens_per_s"]["p50"] == pytest.approx(10.0)  # 4 tokens after the first in 0.4 s
    assert report["aggregate_tokens_per_s"] == pytest.approx(2.5)
    assert report["rss_drift_percent"] == pytest.approx(10.0)
    table = load_serve.format_report(report)
    assert "http_429: 1" in table and "MISSED" in table and "+10.00 %" in table


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0"], ["--host", "192.168.1.5"], ["--host", "example.com"],
                                  ["--server", "http://10.0.0.1:8000"], ["--server", "http://example.com"],
                                  ["--server", "https://127.0.0.1.example.com:8000"]])
def test_refuses_non_loopback(load_serve, argv, capsys):
    assert load_serve.main(argv + ["--minutes", "0.01"]) == 2
    assert "loopback" in capsys.readouterr().err
