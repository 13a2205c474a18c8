"""The supervisor channel over real socket pairs and real peer processes: malformed messages
are skipped and counted, attachments cross as raw bytes, a peer killed mid-message fails
every waiting call at once, a peer that stops reading overflows its bounded buffer (and a
stalled worker is killed and restarted) without blocking anyone."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from typing import cast

import pytest

from gateway.coordination.channel import Calls, Channel, ChannelClosed, Fault, Message
from gateway.supervisor import WorkerPool
from gateway.token.manager import TokenManager
from gateway.token.value import Token
from tests.gateway_helpers import wait_until

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py


async def pair(max_queued: int = 1 << 20) -> tuple[Channel, socket.socket, list[Fault]]:
    ours, theirs = socket.socketpair()
    faults: list[Fault] = []
    channel = await Channel.open(ours, peer="test", max_queued=max_queued,
                                 on_fault=faults.append)
    return channel, theirs, faults


async def test_channel_a_malformed_message_is_counted_and_skipped() -> None:
    channel, theirs, faults = await pair()
    seen: list[Message] = []

    def handle(message: Message) -> None:
        if message.fields.get("newer_than") == "boom":
            raise ValueError("unusable")
        seen.append(message)

    theirs.sendall(b"not json\n" b"[1, 2]\n" b'{"t": "nope"}\n' b'{"t": "get"}\n'
                   b'{"t": "get", "newer_than": "boom"}\n' b'{"t": "get", "newer_than": 3}\n')
    theirs.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(channel.serve(handle), 5)
    assert [(m.kind, dict(m.fields)) for m in seen] == [("get", {"newer_than": 3})]
    assert faults == ["malformed"] * 5
    assert channel.closed
    theirs.close()


async def test_channel_an_attachment_crosses_as_raw_bytes() -> None:
    ours, theirs = socket.socketpair()
    sender = await Channel.open(ours, peer="a", max_queued=1 << 24)
    receiver = await Channel.open(theirs, peer="b", max_queued=1 << 24)
    blob = bytes(range(256)) * 8192  # 2 MiB, every byte value, newlines included
    seen: list[Message] = []
    serving = asyncio.ensure_future(receiver.serve(seen.append))
    assert sender.send("idem_reply", {"id": 1}, blob)
    assert sender.send("idem_reply", {"id": 2})
    await wait_until(lambda: len(seen) == 2)
    assert seen[0].attachment == blob and dict(seen[0].fields) == {"id": 1}
    assert seen[1].attachment == b""
    sender.close()
    await asyncio.wait_for(serving, 5)
    assert receiver.closed


_PEER = """
import os, signal, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
sock.sendall(b'{"t": "idem_reply", "id": 1, "record": null}\\n')
sock.sendall(sys.argv[2].encode())  # half a message
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.integration
@pytest.mark.parametrize("half", ['{"t": "idem_reply", "id"', '{"t": "idem_reply", "id": 2, '
                                  '"n": 1000}\nabc'], ids=["mid-line", "mid-attachment"])
async def test_channel_a_peer_killed_mid_message_fails_every_call_at_once(half: str) -> None:
    """The peer answers call 1, writes half of the next message and is SIGKILLed: call 1 has
    its answer, call 2 fails with ChannelClosed at once (not at its 30 s timeout)."""
    ours, theirs = socket.socketpair()
    channel = await Channel.open(ours, peer="doomed", max_queued=1 << 20)
    calls = Calls(channel, "idem")
    first = asyncio.ensure_future(calls.call({"op": "wait", "key": "a"}, within=30))
    second = asyncio.ensure_future(calls.call({"op": "wait", "key": "b"}, within=30))
    await asyncio.sleep(0)  # both are sent
    peer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PEER, str(theirs.fileno()), half, pass_fds=(theirs.fileno(),))
    theirs.close()
    started = time.monotonic()
    await asyncio.wait_for(channel.serve(calls.settle), 10)
    assert await asyncio.wait_for(peer.wait(), 5) == -9
    assert (await first).fields["id"] == 1
    with pytest.raises(ChannelClosed):
        await second
    assert time.monotonic() - started < 5
    assert calls.pending == 0
    with pytest.raises(ChannelClosed):
        await calls.call({"op": "wait", "key": "c"}, within=30)


async def test_channel_a_peer_that_stops_reading_overflows_without_blocking() -> None:
    overflowed: list[bool] = []
    ours, theirs = socket.socketpair()  # nobody reads theirs
    faults: list[Fault] = []
    channel = await Channel.open(ours, peer="stalled", max_queued=64 * 1024,
                                 on_fault=faults.append,
                                 on_overflow=lambda: overflowed.append(True))
    started = time.monotonic()
    sent = 0
    while sent < 100_000 and channel.send("token", {"token": "x" * 1024}):
        sent += 1
    assert time.monotonic() - started < 2  # never waited for the peer
    assert 0 < sent < 100_000
    assert overflowed == [True] and faults == ["overflow"] and channel.closed
    assert not channel.send("token", {"token": "y"})
    theirs.close()


async def test_channel_a_peer_that_takes_nothing_is_cut_off_after_its_stall() -> None:
    """A large attachment to a peer that never reads: the channel waits ``stall`` seconds
    for any progress, then closes as overflowed; the sender never waited."""
    overflowed: list[bool] = []
    ours, theirs = socket.socketpair()
    channel = await Channel.open(ours, peer="stalled", stall=0.3,
                                 on_overflow=lambda: overflowed.append(True))
    started = time.monotonic()
    assert channel.send("idem_reply", {"id": 1}, b"x" * (4 << 20))
    assert time.monotonic() - started < 0.1
    await wait_until(lambda: overflowed == [True], within=5)
    assert channel.closed and time.monotonic() - started >= 0.3
    theirs.close()


async def test_channel_a_slow_reader_gets_every_big_message_in_order() -> None:
    """Twenty 1 MiB attachments queued at once to a peer that reads slowly: all arrive, in
    order, and the sender's transport never holds more than about a chunk."""
    ours, theirs = socket.socketpair()
    sender = await Channel.open(ours, peer="a", stall=5.0)
    receiver_sock = theirs
    blobs = [bytes([i]) * (1 << 20) for i in range(20)]
    for i, blob in enumerate(blobs):
        assert sender.send("idem_reply", {"id": i + 1}, blob)
    reader, writer = await asyncio.open_connection(sock=receiver_sock, limit=1 << 24)
    got: list[bytes] = []
    most = 0
    for _ in blobs:
        await reader.readline()
        most = max(most, sender._writer.transport.get_write_buffer_size())
        got.append(await reader.readexactly(1 << 20))
        await asyncio.sleep(0.01)  # a slow reader
    assert got == blobs
    assert most <= 2 * (256 * 1024)
    assert not sender.closed
    sender.close()
    writer.close()


async def test_channel_a_frozen_sender_never_cuts_off_a_reading_peer() -> None:
    """The sender's own loop freezes longer than the stall (a paused container, a long
    synchronous step) while its peer keeps reading: on waking, its overdue timer must not
    take the peer for stalled. Judged by progress, everything arrives."""
    ours, theirs = socket.socketpair()
    overflowed: list[bool] = []
    channel = await Channel.open(ours, peer="reader", stall=0.5,
                                 on_overflow=lambda: overflowed.append(True))
    got = [0]

    def read() -> None:  # a peer that reads all the time, slowly, in a thread of its own
        while data := theirs.recv(64 << 10):
            got[0] += len(data)
            time.sleep(0.002)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    total = 0
    for i in range(4):
        assert channel.send("idem_reply", {"id": i + 1}, b"x" * (8 << 20))
        total += 8 << 20
    await asyncio.sleep(0.2)
    time.sleep(0.8)  # noqa: ASYNC251  (the point: the sender's loop is frozen, the peer reads)
    await wait_until(lambda: got[0] >= total or overflowed, within=30)
    assert not overflowed and not channel.closed
    channel.close()
    reader.join(5)
    theirs.close()


async def test_channel_messages_arrive_whole_and_in_order_and_flush_sends_them_all() -> None:
    ours, theirs = socket.socketpair()
    sender = await Channel.open(ours, peer="a")
    receiver = await Channel.open(theirs, peer="b")
    seen: list[Message] = []
    serving = asyncio.ensure_future(receiver.serve(seen.append))
    blob = b"y" * (8 << 20)
    for i in range(3):
        assert sender.send("idem_reply", {"id": i + 1}, blob)
        assert sender.send("token", {"token": i})
    await sender.flush(10.0)
    await asyncio.wait_for(serving, 10)
    assert [(m.kind, m.attachment == blob) for m in seen] == [
        ("idem_reply", True), ("token", False)] * 3
    assert [m.fields.get("token") for m in seen[1::2]] == [0, 1, 2]


def _token(generation: int) -> Token:
    return Token(access="a" * 1024, refresh=None, generation=generation, via="login",
                 obtained_at=0.0, expires_at=1e9, refresh_expires_at=None, obtained_wall=0.0,
                 partner_id="p")


@pytest.mark.integration
async def test_channel_a_stalled_worker_is_restarted_and_blocks_no_broadcast() -> None:
    """Real worker processes that never read their channel: broadcasting tokens to them never
    waits; each channel overflows its bound, and the supervisor kills and restarts that
    worker (as for a dead one)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    faults: list[Fault] = []
    pool = WorkerPool(2, listener, {"default": cast(TokenManager, None)}, None,
                      max_queued=64 * 1024,
                      on_fault=faults.append,
                      command=(sys.executable, "-m", "tests.stalled_worker"))
    await pool.start()
    try:
        first = [w["pid"] for w in pool.status()]
        started = time.monotonic()
        generation = 0
        while faults.count("overflow") < 2 and generation < 20_000:
            generation += 1
            pool.broadcast_token("default", _token(generation))
        assert time.monotonic() - started < 5
        assert faults.count("overflow") == 2

        def restarted() -> bool:
            return all(w["alive"] and w["restarts"] == 1 and w["pid"] not in first
                       for w in pool.status())

        await wait_until(restarted, within=15)
    finally:
        await pool.stop(1.0)
