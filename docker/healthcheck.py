"""Container health check: asks the local gRPC server's grpc.health.v1 service whether it is SERVING.

Usage: python healthcheck.py [SERVICE]. Without SERVICE, the service is read from the container's
main process (`ilf serve NAME` or `python -m services.NAME`), so one HEALTHCHECK fits all four.
Exit 0 when SERVING, 1 otherwise (what Docker's HEALTHCHECK expects).
"""
from __future__ import annotations

import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ilf import config


def service_of(argv: list[str]) -> str | None:
    """The service that a command line serves: `... serve NAME ...` or `... -m services.NAME ...`."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "serve":
            return argv[i + 1]
        if arg == "-m" and argv[i + 1].startswith("services."):
            return argv[i + 1].split(".")[1]
    return None


def main() -> int:
    if len(sys.argv) > 1:
        service = sys.argv[1]
    else:
        cmdline = Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
        service = service_of(cmdline)
    if not service:
        print("healthcheck: cannot tell which service this container runs; pass its name", file=sys.stderr)
        return 1
    port = config.get(f"ILF_{service.upper()}_PORT")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    except grpc.RpcError as error:
        print(f"healthcheck: {service} on port {port}: {error.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{service} on port {port}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
