"""Emulated networks for ``make bench NET=lan|wan``: the two services in separate namespaces.

Why: on loopback bytes and round trips cost nothing, so a protocol that ships more bytes or
needs more round trips looks as fast as one that does not.  Here the custodian runs in one
Linux network namespace and the requester (service and CLI) in another, joined by one
point-to-point link that delays every packet by half the round-trip time in each direction
and serializes it at the link rate (docs/benchmarks.md, Network emulation):

* ``lan``: 1 Gbit/s, 0.2 ms round trip;
* ``wan``: 100 Mbit/s, 40 ms round trip.

The rate is always the kernel's: a ``tbf`` qdisc on the egress of each side's link device
(``_tbf_args`` explains its burst and queue).  The delay comes from the first of these the
kernel supports:

* ``tbf+netem``: a veth pair; each end's ``tbf`` has a ``netem delay RTT/2`` child qdisc;
* ``tbf+tun-relay``: for kernels built without ``sch_netem`` (this benchmark machine's VM
  kernel has none, nor ``fq`` or ``etf``, so no other kernel qdisc can hold a packet for a
  time): one TUN device in each namespace, shaped by its ``tbf``, and a relay process (this
  module's ``relay`` command) that carries each packet the kernel has let out to the other
  namespace ``delay`` later.  TCP sees the real round trip (packets, not streams, are
  delayed) and the real rate (the kernel paces and queues, and pushes back on the sender).

Bytes on the wire are the link's transmit counters (IP packets: TCP/IP and TLS headers,
acknowledgements and retransmissions included).  Everything is torn down on exit, on an
exception and on Ctrl-C (the namespaces carry this process id in their names).  Needs root.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil

from protocol.cli.help import HelpfulParser

__all__ = [
    "NETS",
    "SHAPES",
    "LinkShape",
    "ShapedLink",
    "main",
    "shaped_link",
    "unavailable_reason",
]


@dataclass(frozen=True)
class LinkShape:
    """One emulated link: rate in bit/s both ways and round-trip time in seconds."""

    name: str
    rate_bit_s: int
    rtt_s: float

    @property
    def one_way_s(self) -> float:
        return self.rtt_s / 2

    def describe(self) -> str:
        rate = (f"{self.rate_bit_s / 1e9:g} Gbit/s" if self.rate_bit_s >= 10**9
                else f"{self.rate_bit_s / 1e6:g} Mbit/s")
        return f"{rate}, {self.rtt_s * 1e3:g} ms RTT"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rate_bit_s": self.rate_bit_s, "rtt_s": self.rtt_s}


SHAPES: dict[str, LinkShape] = {
    "lan": LinkShape("lan", 1_000_000_000, 0.0002),
    "wan": LinkShape("wan", 100_000_000, 0.040),
}
#: ``loopback`` is no emulation: both services on 127.0.0.1 in the caller's namespace.
NETS = ("loopback", *SHAPES)

REQUESTER_IP, CUSTODIAN_IP = "10.77.0.1", "10.77.0.2"
#: the relay's queue per direction; beyond it packets are dropped (a router's tail drop)
RELAY_QUEUE_BYTES = 32 * 2**20
_TUN_MTU = 65000
_TUNSETIFF, _IFF_TUN, _IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (None when they can)."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return "network emulation needs Linux network namespaces"
    if os.geteuid() != 0:
        return "network emulation needs root (ip netns, tc)"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"'ip netns' is unavailable: {probe.stderr.strip()}"
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")


def _run_quiet(cmd: Sequence[str]) -> None:
    subprocess.run(list(cmd), capture_output=True, check=False)


@dataclass
class ShapedLink:
    """Two namespaces joined by a shaped link; ``exec_in`` prefixes a command to run inside."""

    shape: LinkShape
    requester_ns: str
    custodian_ns: str
    requester_dev: str
    custodian_dev: str
    method: str  # "tbf+netem" or "tbf+tun-relay"
    requester_ip: str = REQUESTER_IP
    custodian_ip: str = CUSTODIAN_IP
    relay: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def exec_in(self, side: str) -> list[str]:
        """``ip netns exec NS``: the command keeps its pid (ip execs it), so it can be sampled."""
        return ["ip", "netns", "exec", self.requester_ns if side == "a" else self.custodian_ns]

    def relay_cpu_s(self) -> float | None:
        """CPU seconds the relay (the emulated network, no party's work) has used so far."""
        if self.relay is None:
            return None
        try:
            t = psutil.Process(self.relay.pid).cpu_times()
        except psutil.Error:
            return None
        return float(t.user + t.system)

    def tx_bytes(self) -> dict[str, int]:
        """Bytes each side has put on the link so far (IP packets, headers included)."""
        return {"a_to_b": _tx_bytes(self.requester_ns, self.requester_dev),
                "b_to_a": _tx_bytes(self.custodian_ns, self.custodian_dev)}

    def as_dict(self) -> dict[str, Any]:
        return {**self.shape.as_dict(), "method": self.method,
                "requester": f"{self.requester_ns} {self.requester_ip}",
                "custodian": f"{self.custodian_ns} {self.custodian_ip}"}


def _tx_bytes(ns: str, dev: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


#: Largest packet the rate limiter sees on the veth (Ethernet frame of a 1500-byte MTU; GSO
#: super-packets larger than the burst are cut to that size by tbf itself).
_VETH_PACKET = 1514


def _tbf_args(shape: LinkShape, max_packet: int) -> list[str]:
    """``tbf`` for the link rate: the token rate is the link rate, both ways.

    * burst (bucket size): tbf lets a packet out only when the bucket holds all of it, so
      the bucket must hold the largest packet (two, so back-to-back packets do not wait
      for a timer tick), and at least 1 ms of traffic at the rate (125 kB on the LAN,
      12.5 kB on the WAN) so timer granularity cannot cut the rate.  Over any interval the
      bytes sent are at most rate x time + burst, so the average over a bulk transfer is
      the rate; the burst only lets the first few packets of an idle link go back to back,
      as a real NIC would.
    * limit (queue): about one bandwidth-delay product (a router's buffer; 25 kB on the
      LAN, 500 kB on the WAN), never under eight largest packets (with four, a bulk sender's
      bursts of 64 kB TUN packets overflowed it about once per hundred packets); beyond it
      tbf drops, as a router tail-drops, and TCP backs off.
    """
    burst = max(2 * max_packet, shape.rate_bit_s // 8 // 1000)
    limit = max(8 * max_packet, int(shape.rate_bit_s / 8 * shape.rtt_s))
    return ["tbf", "rate", f"{shape.rate_bit_s}bit", "burst", str(burst),
            "limit", str(limit)]


def _shape_rate(ns: str, dev: str, shape: LinkShape, max_packet: int) -> None:
    """The kernel's tbf on ``dev``'s egress, as the root qdisc (handle 1:)."""
    _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", *_tbf_args(shape, max_packet))


def _tc(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["tc", "-n", ns, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc


def rate_qdisc(ns: str, dev: str) -> dict[str, Any]:
    """The root qdisc of ``dev`` with its counters (``tc -s -j``): kind, rate, bytes, drops,
    overlimits (how often a packet had to wait for tokens, i.e. the kernel shaped)."""
    out = _tc(ns, "-s", "-j", "qdisc", "show", "dev", dev, "root").stdout
    found: dict[str, Any] = json.loads(out)[0]
    return found


def _build_veth(link: ShapedLink) -> None:
    _ip("link", "add", link.requester_dev, "type", "veth", "peer", "name", link.custodian_dev)
    _ip("link", "set", link.requester_dev, "netns", link.requester_ns)
    _ip("link", "set", link.custodian_dev, "netns", link.custodian_ns)
    for ns, dev in ((link.requester_ns, link.requester_dev),
                    (link.custodian_ns, link.custodian_dev)):
        _shape_rate(ns, dev, link.shape, _VETH_PACKET)
        # The delay as the tbf's child: a packet is serialized at the rate, then travels.
        cmd = ["tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
               "netem", "delay", f"{link.shape.one_way_s * 1e6:.0f}us", "limit", "100000"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise _NoNetem(proc.stderr.strip())


class _NoNetem(RuntimeError):
    """The kernel has no netem qdisc: fall back to the TUN relay."""


def _start_relay(link: ShapedLink) -> subprocess.Popen[bytes]:
    relay = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.netem", "relay", "--a-dev", link.requester_dev,
         "--b-dev", link.custodian_dev, "--rtt", repr(link.shape.rtt_s)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert relay.stdout is not None
    line = relay.stdout.readline()
    if line.strip() != b"ready":
        relay.kill()
        relay.wait()
        raise RuntimeError(f"network relay failed to start: {line!r}")
    link.relay = relay
    # The relay keeps its file descriptors; the devices move into the namespaces.
    _ip("link", "set", link.requester_dev, "netns", link.requester_ns)
    _ip("link", "set", link.custodian_dev, "netns", link.custodian_ns)
    return relay


def _configure(link: ShapedLink) -> None:
    netem = link.method == "tbf+netem"
    mtu = [] if netem else ["mtu", str(_TUN_MTU)]
    for ns, dev, ip, peer in ((link.requester_ns, link.requester_dev, link.requester_ip,
                               link.custodian_ip),
                              (link.custodian_ns, link.custodian_dev, link.custodian_ip,
                               link.requester_ip)):
        _ip("link", "set", "lo", "up", ns=ns)
        if netem:
            _ip("addr", "add", f"{ip}/30", "dev", dev, ns=ns)
        else:
            _ip("addr", "add", ip, "peer", f"{peer}/32", "dev", dev, ns=ns)
        _ip("link", "set", dev, *mtu, "up", ns=ns)
        if not netem:
            # tbf counts IP packets on a TUN device: the largest is one MTU.
            _shape_rate(ns, dev, link.shape, _TUN_MTU)


@contextmanager
def shaped_link(shape: LinkShape, tag: str = "") -> Iterator[ShapedLink]:
    """Build the two namespaces and the shaped link; tear everything down on the way out."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    base = f"gp{os.getpid()}{tag}"[:11]
    link = ShapedLink(shape=shape, requester_ns=f"{base}-a", custodian_ns=f"{base}-b",
                      requester_dev=f"{base}a", custodian_dev=f"{base}b",
                      method="tbf+netem")
    try:
        _ip("netns", "add", link.requester_ns)
        _ip("netns", "add", link.custodian_ns)
        try:
            _build_veth(link)
        except _NoNetem:
            _run_quiet(["ip", "-n", link.requester_ns, "link", "del", link.requester_dev])
            _run_quiet(["ip", "link", "del", link.requester_dev])
            link.method = "tbf+tun-relay"
            _start_relay(link)
        _configure(link)
        yield link
    finally:
        if link.relay is not None:
            link.relay.terminate()
            try:
                link.relay.wait(timeout=10)
            except subprocess.TimeoutExpired:
                link.relay.kill()
                link.relay.wait()
        for ns in (link.requester_ns, link.custodian_ns):
            _run_quiet(["ip", "netns", "del", ns])
        _run_quiet(["ip", "link", "del", link.requester_dev])


# --------------------------------------------------------------------------- measuring it

#: The sink in the custodian's namespace: accepts one connection, reads until EOF and
#: prints how many bytes arrived and when the first quarter and the last byte did.
_SINK = """import socket,sys,time
s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)
s.bind((sys.argv[1],int(sys.argv[2])));s.listen();print('up',flush=True)
c,_=s.accept();n=0;q=int(sys.argv[3])//4;tq=None
while (d:=c.recv(1<<20)):
    n+=len(d)
    if tq is None and n>=q:
        tq=time.perf_counter();nq=n
t=time.perf_counter();c.sendall(str(n).encode());c.close()
print(n,nq,tq,t,flush=True)
"""
#: The sender in the requester's namespace: times a TCP connect (one round trip), then
#: sends ``nbytes`` and waits for the sink's count.
_SEND = """import socket,sys,time
t=time.perf_counter();s=socket.create_connection((sys.argv[1],int(sys.argv[2])))
rtt=time.perf_counter()-t;t=time.perf_counter()
s.sendall(bytes(int(sys.argv[3])));s.shutdown(socket.SHUT_WR);n=int(s.recv(64))
print(rtt,n,time.perf_counter()-t)
"""


def measure(link: ShapedLink, nbytes: int, port: int = 9200) -> dict[str, float]:
    """A TCP connect and a bulk transfer from the requester's namespace to the custodian's.

    ``connect_s`` is one round trip (SYN, SYN-ACK).  ``steady_bit_s`` is the receiver's rate
    over the last three quarters of the transfer (past TCP slow start), the figure that
    should equal the link rate; ``bulk_bit_s`` includes slow start and the closing round
    trip.  Both processes are real and run inside their namespaces.
    """
    sink = subprocess.Popen([*link.exec_in("b"), sys.executable, "-c", _SINK,
                             link.custodian_ip, str(port), str(nbytes)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "up":
            raise RuntimeError("the measuring sink did not start")
        sent = subprocess.run([*link.exec_in("a"), sys.executable, "-c", _SEND,
                               link.custodian_ip, str(port), str(nbytes)],
                              capture_output=True, text=True, check=True, timeout=300)
        received, at_quarter, t_quarter, t_last = sink.stdout.readline().split()
        sink.wait(timeout=30)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    connect_s, acked, bulk_s = sent.stdout.split()
    if int(acked) != nbytes or int(received) != nbytes:
        raise RuntimeError(f"sent {nbytes} bytes, the sink counted {received}")
    steady_bytes = nbytes - int(at_quarter)
    return {"connect_s": float(connect_s), "bytes": nbytes, "bulk_s": float(bulk_s),
            "bulk_bit_s": nbytes * 8 / float(bulk_s),
            "steady_bit_s": steady_bytes * 8 / (float(t_last) - float(t_quarter))}


# --------------------------------------------------------------------------- TUN relay


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


class _Direction:
    """One direction of the link after the kernel's tbf: the one-way delay, nothing else."""

    def __init__(self, delay_s: float) -> None:
        self.delay = delay_s
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued_bytes = 0
        self.dropped = 0

    def admit(self, packet: bytes, now: float) -> None:
        if self.queued_bytes + len(packet) > RELAY_QUEUE_BYTES:
            self.dropped += 1
            return
        self.queue.append((now + self.delay, packet))
        self.queued_bytes += len(packet)

    def deliver(self, fd: int, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _due, packet = self.queue.popleft()
            self.queued_bytes -= len(packet)
            try:
                os.write(fd, packet)
            except OSError:  # the far device is not up yet, or its queue is full: lost
                self.dropped += 1

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.queue else None


def relay(a_dev: str, b_dev: str, rtt_s: float) -> int:
    """Carry packets between two TUN devices half the round trip later, until killed.

    The rate is not the relay's: each device's tbf lets packets out at the link rate.
    """
    fds = {"a": _open_tun(a_dev), "b": _open_tun(b_dev)}
    out = {"a": _Direction(rtt_s / 2), "b": _Direction(rtt_s / 2)}
    peer = {"a": "b", "b": "a"}
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C reaches the whole process group: the harness, not the relay, decides teardown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("ready", flush=True)
    by_fd = {fd: side for side, fd in fds.items()}
    while not stop:
        now = time.monotonic()
        dues = [d for d in (out["a"].next_due(), out["b"].next_due()) if d is not None]
        timeout = max(0.0, min(dues) - now) if dues else 0.5
        try:
            ready, _, _ = select.select(list(by_fd), [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in ready:
            side = by_fd[fd]
            while True:
                try:
                    packet = os.read(fd, _TUN_MTU + 100)
                except BlockingIOError:
                    break
                except OSError:
                    stop = True
                    break
                out[side].admit(packet, now)
        for side in ("a", "b"):
            out[side].deliver(fds[peer[side]], time.monotonic())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.netem relay ...`` (started by :func:`shaped_link`) or ``check``."""
    p = HelpfulParser(prog="python -m benchmarks.netem",
                      description="Network emulation for the scale benchmark.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay", help="forward packets between two TUN devices (internal)")
    r.add_argument("--a-dev", required=True, help="requester-side TUN device to create")
    r.add_argument("--b-dev", required=True, help="custodian-side TUN device to create")
    r.add_argument("--rtt", type=float, required=True,
                   help="round-trip time, seconds (the rate is the kernel tbf's)")
    c = sub.add_parser("check", help="build a shaped link, measure its round trip and rate "
                       "against the configured ones, print both as JSON, and tear it down")
    c.add_argument("--net", choices=sorted(SHAPES), default="wan", help="which link")
    c.add_argument("--bytes", type=int, default=0,
                   help="bulk transfer size (0: 4 seconds of traffic at the link rate)")
    args = p.parse_args(argv)
    if args.cmd == "relay":
        return relay(args.a_dev, args.b_dev, args.rtt)
    shape = SHAPES[args.net]
    with shaped_link(shape) as link:
        measured = measure(link, args.bytes or shape.rate_bit_s // 2)
        qdisc = rate_qdisc(link.requester_ns, link.requester_dev)
        print(json.dumps({**link.as_dict(), "measured": measured,
                          "steady_vs_rate": round(measured["steady_bit_s"] / shape.rate_bit_s, 3),
                          "requester_qdisc": qdisc}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
