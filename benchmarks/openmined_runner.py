"""OpenMined PSI on the benchmark's match keys; runs inside ``.venv-openmined`` only.

Why a separate interpreter: ``openmined-psi`` pins a protobuf release that conflicts with
the one our gRPC stack needs, so ``benchmarks.scale`` runs this file as a subprocess in its
own virtualenv.  It must therefore import nothing from this project: stdlib and
``private_set_intersection`` only.

Inputs are the exact OPRF inputs of our protocol (hex, one match key per line): the
custodian's in-scope record keys (the server set) and the requester's accepted query keys
(the client set).  It runs OpenMined's standard in-process flow, with the client learning
the intersection:

    setup    = server.CreateSetupMessage(fpr, len(client_items), server_items)
    request  = client.CreateRequest(client_items)
    response = server.ProcessRequest(request)
    indices  = client.GetIntersection(setup, response)

and reports wall and CPU time per call, serialized message sizes per direction (setup and
response go server -> client, the request client -> server), peak RSS and the intersection
size.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _read_keys(path: Path) -> list[bytes]:
    with path.open(encoding="ascii") as fh:
        return [bytes.fromhex(line) for line in (raw.strip() for raw in fh) if line]


def _size(message: Any) -> int:
    """Serialized size of a protobuf message (what would go on the wire)."""
    return len(message.SerializeToString())


def run(server_items: list[bytes], client_items: list[bytes], fpr: float,
        data_structure: str = "GCS") -> dict[str, object]:
    """One PSI run; both parties in this process, as in OpenMined's own examples."""
    import private_set_intersection.python as psi

    ds = getattr(psi.DataStructure, data_structure)
    server = psi.server.CreateWithNewKey(True)
    client = psi.client.CreateWithNewKey(True)
    phases: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        phases[name] = time.perf_counter() - w0
        cpu[name] = time.process_time() - c0
        return out

    setup = timed("setup", server.CreateSetupMessage, fpr, len(client_items), server_items, ds)
    request = timed("request", client.CreateRequest, client_items)
    response = timed("process", server.ProcessRequest, request)
    intersection = timed("intersection", client.GetIntersection, setup, response)
    setup_bytes, request_bytes, response_bytes = _size(setup), _size(request), _size(response)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "version": getattr(psi, "__version__", ""),
        "fpr": fpr,
        "data_structure": data_structure,
        "server_items": len(server_items),
        "client_items": len(client_items),
        "intersection": len(intersection),
        "intersection_indices": sorted(int(i) for i in intersection),
        "wall_s": sum(phases.values()),
        "cpu_s": sum(cpu.values()),
        "phases": phases,
        "phase_cpu_s": cpu,
        "bytes_a_to_b": request_bytes,
        "bytes_b_to_a": setup_bytes + response_bytes,
        "setup_bytes": setup_bytes,
        "request_bytes": request_bytes,
        "response_bytes": response_bytes,
        "peak_rss": peak_kib * 1024,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run OpenMined PSI on hex-encoded match keys.")
    p.add_argument("--server-keys", type=Path, required=True, help="custodian keys, hex lines")
    p.add_argument("--client-keys", type=Path, required=True, help="requester keys, hex lines")
    p.add_argument("--fpr", type=float, default=1e-9, help="false-positive rate (default 1e-9)")
    p.add_argument("--data-structure", default="GCS", choices=["GCS", "BLOOM_FILTER", "RAW"],
                   help="server setup encoding (OpenMined's default: GCS)")
    p.add_argument("--out", type=Path, required=True, help="write the JSON result here")
    args = p.parse_args(argv)
    server_items = _read_keys(args.server_keys)
    client_items = _read_keys(args.client_keys)
    result = run(server_items, client_items, args.fpr, args.data_structure)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "intersection")}), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
