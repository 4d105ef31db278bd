"""The loopback fake Hub's throttles and download faults (what the streaming tests and benchmarks rely on).

The token bucket is checked against a fake clock; the faults against real sockets on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fake_hub as fh_mod  # noqa: E402
from fake_hub import FakeHub, TokenBucket  # noqa: E402

SHARD = "model-00001-of-00001.safetensors"


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(fh_mod.time, "monotonic", c.monotonic)
    monkeypatch.setattr(fh_mod.time, "sleep", c.sleep)
    return c


def test_token_bucket_holds_the_rate_after_its_burst(clock):
    b = TokenBucket(1000.0, burst=500)
    b.take(500)  # the burst passes at once
    assert clock.slept == []
    for _ in range(10):
        b.take(100)
    assert clock.now - 100.0 == pytest.approx(1.0)  # 1000 more bytes at 1000 B/s
    clock.now += 10.0  # idle: credit refills only up to the burst
    b.take(1500)
    assert clock.now - 111.0 == pytest.approx(1.0)


def test_token_bucket_is_shared_across_takers(clock):
    b = TokenBucket(100.0, burst=0)
    b.take(100)
    b.take(100)  # a second "connection" queues behind the first
    assert sum(clock.slept) == pytest.approx(2.0)
    TokenBucket(None).take(10**9)
    assert sum(clock.slept) == pytest.approx(2.0)


def _get(hub: FakeHub, path: str, *, rng: str | None = None, timeout: float = 5.0):
    import httpx2

    headers = {"Range": rng} if rng else {}
    with httpx2.Client(timeout=timeout) as c:
        return c.get(f"{hub.endpoint}/org/src/resolve/main/{path}", headers=headers)


def _stream(hub: FakeHub, path: str, *, timeout: float = 5.0) -> tuple[bytes, BaseException | None]:
    import httpx2

    got = bytearray()
    try:
        with httpx2.Client(timeout=timeout) as c, c.stream("GET", f"{hub.endpoint}/org/src/resolve/main/{path}") as r:
            for piece in r.iter_raw():
                got += piece
    except Exception as e:  # noqa: BLE001
        return bytes(got), e
    return bytes(got), None


def test_reset_mid_file_then_a_range_request_gets_the_rest():
    data = os.urandom(300_000)
    with FakeHub(download_rate=50e6) as hub:
        hub.create("org/src", {SHARD: data})
        hub.fault_download(SHARD, reset_after=100_000)
        got, err = _stream(hub, SHARD)
        assert err is not None and len(got) == 100_000 and got == data[:100_000]
        r = _get(hub, SHARD, rng=f"bytes={len(got)}-")
        assert r.status_code == 206 and got + r.content == data
        assert hub.ranged_gets(SHARD) == [None, "bytes=100000-"]
        assert [p for p, _ in hub.fired_faults] == [SHARD]
        assert hub.bytes_served == len(data)


def test_a_stall_times_the_client_out_and_faults_fire_once():
    data = os.urandom(200_000)
    with FakeHub() as hub:
        hub.create("org/src", {SHARD: data, "config.json": b"{}"})
        hub.fault_download("*.safetensors", stall_after=4096, stall_s=5.0)
        assert _get(hub, "config.json").content == b"{}"  # not matching: untouched
        got, err = _stream(hub, SHARD, timeout=0.3)
        assert type(err).__name__ == "ReadTimeout" and got == data[:4096]
        assert _get(hub, SHARD).content == data


def test_status_faults_on_download_spare_the_head():
    import httpx2

    with FakeHub() as hub:
        hub.create("org/src", {SHARD: b"x" * 10})
        hub.fail_next("download", 429, 503)
        url = f"{hub.endpoint}/org/src/resolve/main/{SHARD}"
        assert httpx2.head(url).status_code == 200
        assert [_get(hub, SHARD).status_code for _ in range(3)] == [429, 503, 200]
        assert _get(hub, SHARD, rng="bytes=10-").status_code == 416


def test_upload_bodies_are_read_through_the_upload_throttle(monkeypatch):
    taken: list[int] = []
    with FakeHub(upload_rate=1e9) as hub:
        monkeypatch.setattr(hub.upload_bucket, "take", taken.append)
        body = os.urandom(200_000)
        s = socket.create_connection(("127.0.0.1", int(hub.endpoint.rsplit(":", 1)[1])))
        s.sendall(b"PUT /__lfs/" + b"0" * 64 + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        s.close()
        assert sum(taken) == len(body) and max(taken) <= fh_mod.THROTTLE_CHUNK
        assert hub.lfs_store["0" * 64] == body and hub.bytes_received == len(body)
