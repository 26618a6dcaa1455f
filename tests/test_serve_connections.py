"""Connection hygiene on a real loopback server: idle, half-sent and surplus connections are closed."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tspo.retrieval import BM25Retriever
from tspo.retrieval.server import ServerSettings, start_server
from tspo.retrieval.synthetic import synthetic_passages

KEEP_ALIVE = 1.0
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.0
MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def server():
    retriever = BM25Retriever.build(synthetic_passages(50, seed=1))
    settings = ServerSettings(
        port=0,
        keep_alive_s=KEEP_ALIVE,
        header_timeout_s=HEADER_TIMEOUT,
        body_timeout_s=BODY_TIMEOUT,
        max_connections=MAX_CONNECTIONS,
    )
    with start_server(retriever, settings) as running:
        deadline = time.monotonic() + 30
        while httpx.get(running.url + "/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield running


def connect(server) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (reading whatever it sent first), at most ``limit``."""
    started = time.monotonic()
    sock.settimeout(limit)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return float("inf"), received
    except ConnectionResetError:
        pass
    return time.monotonic() - started, received


def test_a_connection_that_never_speaks_is_closed_after_the_keep_alive_timeout(server):
    with connect(server) as sock:
        seconds, received = closed_after(sock, 10)
    assert received == b""
    assert KEEP_ALIVE * 0.8 <= seconds < KEEP_ALIVE + 2


def test_a_request_head_trickled_byte_by_byte_is_cut_off(server):
    """Each byte would restart a keep-alive timer; the header timeout counts from the first one."""
    head = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
    with connect(server) as sock:
        started = time.monotonic()
        try:
            for byte in head:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        seconds, _ = closed_after(sock, 10)
    total = time.monotonic() - started
    assert total < HEADER_TIMEOUT + 2  # 40+ bytes at 0.1 s would take over 4 s
    assert seconds < 10


def test_a_half_sent_body_gets_408_json(server):
    body = json.dumps({"queries": ["anything at all"]}).encode()
    head = f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head.encode() + body[:10])
        seconds, received = closed_after(sock, 10)
    assert received.startswith(b"HTTP/1.1 408 ")
    payload = json.loads(received.split(b"\r\n\r\n", 1)[1])
    assert payload["error"] == f"request body incomplete after {BODY_TIMEOUT:g}s (10 bytes received)"
    assert seconds < BODY_TIMEOUT + 2


def test_connections_beyond_the_cap_get_503_json_and_are_closed(server):
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.1)  # let the server accept them
        with connect(server) as extra:
            seconds, received = closed_after(extra, 5)
        assert seconds < 5
        assert received.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"retry-after: 1" in received
        assert json.loads(received.split(b"\r\n\r\n", 1)[1]) == {
            "error": f"server is at its limit of {MAX_CONNECTIONS} open connections; retry shortly"
        }
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    # Below the cap again, a keep-alive client is served as usual, several requests on one connection.
    with httpx.Client(base_url=server.url, timeout=5) as client:
        for _ in range(3):
            assert client.post("/retrieve", json={"queries": ["ba"]}).status_code == 200


def test_a_busy_keep_alive_connection_is_not_cut(server):
    """Requests spaced closer than the timeouts keep one connection open past both of them."""
    body = json.dumps({"queries": ["ba"]}).encode()
    request = f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    with connect(server) as sock:
        reader = sock.makefile("rb")
        started = time.monotonic()
        answered = 0
        while time.monotonic() - started < HEADER_TIMEOUT + KEEP_ALIVE + 0.5:
            sock.sendall(request)
            status = reader.readline()
            assert status.startswith(b"HTTP/1.1 200 "), status
            length = 0
            while (line := reader.readline()) != b"\r\n":
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            assert reader.read(length).startswith(b'{"result":')
            answered += 1
            time.sleep(0.3)
    assert answered >= 8
