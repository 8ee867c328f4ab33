"""Our servers accept our clients' keepalive pings on a long silent stream (proto.service_kit).

A job-watch stream can stay silent for minutes while a 1.28M match runs, and the client pings
every ``KEEPALIVE_MS``.  gRPC's server default answers such pings with ``GOAWAY
too_many_pings``, which ended a benchmark run.  The option that allows them has to be spelt
as gRPC core spells it (``GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS``): gRPC
ignores unknown keys silently, and an earlier build's misspelt key did nothing.  (A scaled-
down reproduction with 100 ms pings did not trigger the GOAWAY here, so this checks the key
and the floor, not the transport's behaviour.)
"""

from __future__ import annotations

from proto import service_kit as kit


def test_the_services_allow_their_own_clients_keepalive() -> None:
    assert kit.server_ping_options(kit.KEEPALIVE_MS) == kit.SERVER_ONLY_OPTIONS
    (key, floor), = kit.SERVER_ONLY_OPTIONS
    assert key == "grpc.http2.min_ping_interval_without_data_ms"
    assert 0 < floor < kit.KEEPALIVE_MS
    assert ("grpc.keepalive_time_ms", kit.KEEPALIVE_MS) in kit.CHANNEL_OPTIONS
