"""`python -m devcluster serve --nodes N --http-port P --workdir DIR`: run the double until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

from .cluster import Cluster, ClusterError
from .persistence import PersistenceError
from .realism import RealismError, add_arguments, from_args


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return value


def build_parser() -> argparse.ArgumentParser:
    serve = argparse.ArgumentParser(
        prog="python -m devcluster serve",
        description="Agent k answers on 127.0.0.1:P+k; DIR/cluster.json appears once every port listens.",
    )
    serve.add_argument("--nodes", type=_positive_int, required=True, help="number of nodes (agents)")
    serve.add_argument("--http-port", type=_port, required=True, help="HTTP port of node-000; node k uses P+k")
    serve.add_argument("--workdir", type=Path, required=True, help="where cluster.json, inventory.yml, node dirs go")
    serve.add_argument("--acl-token", help="enable default-deny ACLs with this management token")
    serve.add_argument("--data-dir", type=Path, help="keep the servers' state here across restarts")
    serve.add_argument("--datacenter", default="dc1", help="datacenter name (default: dc1)")
    serve.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate (chain) on every port")
    serve.add_argument("--tls-key", type=Path, help="the PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", type=Path,
                       help="require client certificates signed by this PEM CA (Consul's verify_incoming)")
    add_arguments(serve)
    return serve


async def _serve(args: argparse.Namespace) -> int:
    cluster = Cluster(
        nodes=args.nodes,
        http_port=args.http_port,
        workdir=args.workdir,
        acl_token=args.acl_token,
        data_dir=args.data_dir,
        datacenter=args.datacenter,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        realism=from_args(args, args.nodes),
        tls_client_ca=args.tls_client_ca,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    began = time.monotonic()
    await cluster.start()
    last = cluster.nodes[-1]
    scheme = "https" if cluster.tls else "http"
    print(
        f"devcluster: {len(cluster.nodes)} agents on {scheme}://{cluster.host}:{cluster.http_port}..{last.port} "
        f"(datacenter {cluster.datacenter}) up in {time.monotonic() - began:.2f}s; "
        f"{cluster.workdir / 'cluster.json'}",
        flush=True,
    )
    await stop.wait()
    await cluster.close()
    print("devcluster: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="devcluster: %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_serve(args))
    except (ClusterError, PersistenceError, RealismError) as err:
        print(f"devcluster: error: {err}", file=sys.stderr)
        return 1
