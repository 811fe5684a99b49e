"""What a hostile client does over a raw socket: a huge ``Transfer-Encoding: chunked`` body, sent as fast as the
server reads it, with the response read as soon as it comes. Shared by tests/api/test_hostile_http.py and
``benchmarks/hostile_body.py``."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx


@dataclass
class ChunkedResult:
    status: int | None  # None: no response came
    body: bytes
    seconds: float  # from the first body byte sent to the response's status line
    sent: int  # body bytes the server took before it answered / closed


def chat_body(total: int, model: str = "base", content_chars: int = 60_000):
    """A valid chat-completions JSON body of about ``total`` bytes, in pieces: messages each within the field
    limits (the 7 MB / 48 MB attack of issue 20)."""
    yield b'{"model":"' + model.encode() + b'","max_tokens":4,"messages":['
    message = b'{"role":"user","content":"' + b"x" * content_chars + b'"}'
    sent = 0
    while sent < total:
        yield message if sent == 0 else b"," + message
        sent += len(message) + 1
    yield b"]}"


def send_chunked(port: int, path: str, body, *, headers: dict[str, str] | None = None,
                 timeout: float = 60.0) -> ChunkedResult:
    """POST ``body`` (an iterable of byte pieces, one chunk each) with chunked encoding to 127.0.0.1:``port``;
    stops sending once the server answers or closes."""
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            "Transfer-Encoding: chunked", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    answered = threading.Event()
    response = bytearray()
    t_status: list[float] = []

    def reader() -> None:
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                response.extend(data)
                if not t_status and b"\r\n" in response:
                    t_status.append(time.perf_counter())
                    answered.set()
                head_end = response.find(b"\r\n\r\n")
                if head_end >= 0:
                    length = _content_length(bytes(response[:head_end]))
                    if length is not None and len(response) >= head_end + 4 + length:
                        break
        except OSError:
            pass
        finally:
            answered.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    t0, sent = time.perf_counter(), 0
    try:
        for piece in body:
            if answered.is_set():
                break
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sent += len(piece)
        if not answered.is_set():
            sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server closed its side after answering
        pass
    thread.join(timeout)
    sock.close()
    status = None
    if response.startswith(b"HTTP/1.1 "):
        status = int(response[9:12])
    body = bytes(response[response.find(b"\r\n\r\n") + 4:]) if b"\r\n\r\n" in response else b""
    return ChunkedResult(status, body, (t_status[0] if t_status else time.perf_counter()) - t0, sent)


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def rss_bytes() -> int:
    """This process's resident set size (the loopback server runs in it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def health_pings(url: str, *, interval: float = 0.005, min_pings: int = 5, wait: float = 10.0):
    """Ping ``url``/health from a thread while the body runs; yields the list of latencies (seconds). On exit it
    waits (up to ``wait`` s) for ``min_pings`` answers: a loaded machine may schedule the pinger late. A ping
    that is not a 200 fails the pinger (the list then stops growing, so the caller's checks fail)."""
    latencies: list[float] = []
    stop = threading.Event()

    def ping() -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            while not stop.is_set():
                t = time.perf_counter()
                assert c.get("/health").status_code == 200
                latencies.append(time.perf_counter() - t)
                time.sleep(interval)

    pinger = threading.Thread(target=ping, daemon=True)
    pinger.start()
    try:
        yield latencies
        deadline = time.monotonic() + wait
        while len(latencies) < min_pings and pinger.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        pinger.join(10)
