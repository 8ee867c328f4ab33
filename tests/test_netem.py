"""The emulated network of ``make bench NET=wan``: real namespaces, a real shaped link, a real
match over mTLS across it, and nothing left behind.

The rate is the kernel's tbf on each end (checked from its counters); the delay is netem's
where the kernel has it, else the user-space relay's.  Needs root and ``ip netns``; without
them every test here is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import netem, scale

REASON = netem.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None,
                                reason=f"network emulation unavailable: {REASON}")
WAN = netem.SHAPES["wan"]


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _echo_server(link: netem.ShapedLink, port: int) -> subprocess.Popen[bytes]:
    code = ("import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,"
            f"socket.SO_REUSEADDR,1)\ns.bind(({link.custodian_ip!r},{port}))\ns.listen()\n"
            "print('up',flush=True)\nc,_=s.accept()\nc.sendall(c.recv(16))\n")
    proc = subprocess.Popen([*link.exec_in("b"), sys.executable, "-c", code],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
    return proc


def test_link_delays_every_round_trip_and_is_torn_down() -> None:
    """A TCP connect and a one-byte echo from the requester's namespace each take at least
    the configured round trip; afterwards the namespaces are gone."""
    with netem.shaped_link(WAN, tag="t1") as link:
        assert {link.requester_ns, link.custodian_ns} <= _namespaces()
        server = _echo_server(link, 9100)
        code = ("import socket,time\nt=time.perf_counter()\n"
                f"s=socket.create_connection(({link.custodian_ip!r},9100))\n"
                "c=time.perf_counter()-t\nt=time.perf_counter()\ns.sendall(b'x')\n"
                "assert s.recv(16)==b'x'\nprint(c,time.perf_counter()-t)")
        out = subprocess.run([*link.exec_in("a"), sys.executable, "-c", code],
                             capture_output=True, text=True, check=True, timeout=60)
        server.wait(timeout=30)
        connect_s, echo_s = map(float, out.stdout.split())
        sent = link.tx_bytes()
    assert connect_s >= WAN.rtt_s and echo_s >= WAN.rtt_s, (connect_s, echo_s)
    # Under a second: the delay is the configured one, not a timeout or a retransmission.
    assert connect_s < 1.0 and echo_s < 1.0
    assert sent["a_to_b"] > 0 and sent["b_to_a"] > 0
    assert not {link.requester_ns, link.custodian_ns} & _namespaces()


def test_namespaces_removed_when_the_body_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"), netem.shaped_link(WAN, tag="t2") as link:
        names = {link.requester_ns, link.custodian_ns}
        assert names <= _namespaces()
        raise RuntimeError("boom")
    assert not names & _namespaces()


def test_kernel_tbf_shapes_a_bulk_transfer_at_the_link_rate() -> None:
    """Both link ends carry the kernel's tbf at the link rate, and it is what paces a bulk
    transfer: its counters saw every byte and made packets wait for tokens, and the transfer
    never beats the rate (bytes over any interval <= rate x time + one burst)."""
    nbytes = 8_000_000  # 0.64 s at 100 Mbit/s
    with netem.shaped_link(WAN, tag="t3") as link:
        got = netem.measure(link, nbytes, port=9101)
        ends = [netem.rate_qdisc(link.requester_ns, link.requester_dev),
                netem.rate_qdisc(link.custodian_ns, link.custodian_dev)]
    for qdisc in ends:
        assert qdisc["kind"] == "tbf", qdisc
        assert qdisc["options"]["rate"] * 8 == WAN.rate_bit_s, qdisc
    sender, receiver = ends
    assert sender["bytes"] >= nbytes and sender["overlimits"] > 0, sender
    assert receiver["bytes"] > 0  # the acknowledgements went back through the other end
    burst = sender["options"]["burst"]
    assert got["bulk_s"] >= (nbytes - burst) * 8 / WAN.rate_bit_s, got
    steady_s = nbytes * 3 / 4 * 8 / got["steady_bit_s"]
    assert got["steady_bit_s"] <= WAN.rate_bit_s * (1 + burst * 8 / WAN.rate_bit_s / steady_s)
    assert got["connect_s"] >= WAN.rtt_s


@pytest.mark.slow  # 105 s under load: a full harness run on the shaped WAN link
def test_match_across_namespaces_over_mtls(tmp_path: Path) -> None:
    """The harness at 200 x 200 on the WAN link: services in two namespaces, the custodian
    dialled at its link address over mTLS, pairs equal to the plaintext join, the shaped
    round trip visible to the protocol, and every payload byte on the wire."""
    t0 = time.perf_counter()
    path, run = scale.run_benchmark(
        [200], ["oprf"], nets=["wan"], per_core=False, data_dir=tmp_path / "data",
        results_dir=tmp_path / "results", op_sample=200, command=["test"])
    (row,) = run["runs"]
    assert path.parent == tmp_path / "results" / "runs"
    assert row["net"] == "wan" and row["matches_agree_with_plaintext"] is True
    assert row["pair_check"]["pairs"] == row["pair_check"]["expected_pairs"] > 0
    wire = row["wire"]
    assert wire["measured_rtt_s"] >= WAN.rtt_s
    # On the wire = payload + TLS/HTTP2/TCP/IP overhead: never less than the payload.
    assert wire["a_to_b"] >= row["bytes_a_to_b"] and wire["b_to_a"] >= row["bytes_b_to_a"]
    # A session needs several round trips (open, evaluate, tags, disclose, close).
    assert row["wall_s"] >= 3 * WAN.rtt_s
    assert run["nets"]["wan"] == WAN.as_dict()
    assert time.perf_counter() - t0 < 300
    assert not any(ns.startswith(f"gp{os.getpid()}") for ns in _namespaces())
