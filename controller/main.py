"""``meshsec-controller``: CA, inventory and gRPC API for a meshsec mesh.

Exit status: 0 after SIGTERM/SIGINT, 2 for a bad command line or inventory
(one message on stderr, ``FILE:LINE: FIELD: problem`` for the inventory),
1 if it cannot listen. ``--check FILE`` validates an inventory and prints every
error (exit 0 if it is good, 2 if not) without starting anything.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import sys
import threading
from pathlib import Path

from controller.inventory import InventoryError, parse_duration
from controller.server import ControllerServer, default_server_names, split_listen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshsec-controller",
                                description="meshsec controller: enrols nodes and serves their views")
    p.add_argument("--inventory", metavar="FILE",
                   help="inventory YAML (nodes, defaults, groups, policies); polled every second and reloaded in "
                        "place when it changes (a bad edit is logged and the previous inventory kept)")
    p.add_argument("--check", metavar="FILE",
                   help="validate inventory FILE, print every error (FILE:LINE: FIELD: problem), exit 0 if it is "
                        "good and 2 if not; starts nothing (--listen/--server-name count as the controller's "
                        "addresses)")
    p.add_argument("--state-dir", default="/var/lib/meshsec-controller", metavar="DIR",
                   help="SQLite state and ca.pem (default: %(default)s)")
    p.add_argument("--listen", default="0.0.0.0:7443", metavar="HOST:PORT",
                   help="enrol port: gRPC over server-side TLS (default: %(default)s)")
    p.add_argument("--watch-listen", default=None, metavar="HOST:PORT",
                   help="watch port: gRPC over mutual TLS (default: the --listen host, port + 1)")
    p.add_argument("--server-name", action="append", default=[], metavar="NAME",
                   help="DNS name or IP for the controller's TLS certificate (repeatable; "
                        "default: the listen IP and the hostname; 'meshsec-controller' is always included)")
    p.add_argument("--cert-lifetime", default="24h", metavar="DURATION",
                   help="lifetime of issued node certificates: seconds or 30m/24h/7d (default: %(default)s)")
    kube = p.add_argument_group("Kubernetes node source (docs/kubernetes.md)",
                                "every cluster Node becomes a gateway peer: InternalIPs as endpoints, "
                                "spec.podCIDRs as its subnets; merged with the --inventory nodes")
    src = kube.add_mutually_exclusive_group()
    src.add_argument("--kubernetes", action="store_true",
                     help="watch Nodes with the in-cluster service account (inside a pod)")
    src.add_argument("--kubeconfig", metavar="FILE", help="watch Nodes of the cluster in this kubeconfig")
    kube.add_argument("--kube-join-token-file", metavar="FILE",
                      help="file with the one join token every cluster node's agent presents (from a Secret)")
    kube.add_argument("--kube-token-review", action="store_true",
                      help="also accept a projected service-account token, checked with a TokenReview: "
                           "it must belong to --kube-service-account and be bound to a pod on the enrolling node")
    kube.add_argument("--kube-service-account", metavar="system:serviceaccount:NS:NAME",
                      default="system:serviceaccount:meshsec:meshsec-agent",
                      help="the agents' service account for --kube-token-review (default: %(default)s)")
    kube.add_argument("--kube-audience", default="meshsec",
                      help="audience the projected token must carry (default: %(default)s)")
    kube.add_argument("--kube-ca-configmap", metavar="NAMESPACE/NAME",
                      help="publish the controller CA certificate as key ca.pem of this existing ConfigMap (and "
                           "repair it every minute), for the agents to mount; needs get and patch on it only")
    ha = p.add_argument_group("high availability (docs/ha.md)")
    ha.add_argument("--etcd-endpoints", metavar="URL[,URL...]",
                    help="keep state in etcd (https://HOST:PORT, comma-separated) instead of SQLite under "
                         "--state-dir; replicas elect a leader on an etcd lease")
    ha.add_argument("--etcd-cacert", metavar="FILE",
                    help="PEM CA that signed etcd's server certificate (default: the system trust store)")
    ha.add_argument("--etcd-cert", metavar="FILE", help="PEM client certificate for etcd's --client-cert-auth")
    ha.add_argument("--etcd-key", metavar="FILE", help="unencrypted PEM key of --etcd-cert")
    ha.add_argument("--etcd-allow-plain-http", action="store_true",
                    help="allow http:// to a non-loopback etcd (logged): the CA private key then crosses the "
                         "network in the clear")
    ha.add_argument("--etcd-prefix", default="/meshsec/", help="etcd key prefix (default: %(default)s)")
    ha.add_argument("--etcd-lease-ttl", type=int, default=10, metavar="SECONDS",
                    help="leader lease: a dead leader is replaced within about this time (default: %(default)s)")
    ha.add_argument("--replica-id", default=None, help="this replica's name in etcd (default: hostname-pid)")
    p.add_argument("--metrics-listen", default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; docs/metrics.md)")
    p.add_argument("--health-listen", default=None, metavar="HOST:PORT",
                   help="plain-text gRPC port with only grpc.health.v1 and reflection, for probes (default: off; "
                        "the TLS ports serve both anyway)")
    mesh = p.add_argument_group("seeing the mesh (docs/metrics.md)")
    mesh.add_argument("--web-listen", default=None, metavar="HOST:PORT",
                      help="serve the read-only mesh page at https://HOST:PORT/ with the controller's TLS "
                           "certificate (default: off)")
    mesh.add_argument("--web-client-auth", choices=("required", "none"), default="required",
                      help="'required' (default): browsers present a certificate of the mesh CA (or "
                           "--web-client-ca); 'none': anyone reaching the port sees the mesh (logged)")
    mesh.add_argument("--web-client-ca", default=None, metavar="FILE",
                      help="also accept client certificates signed by this PEM CA on the web page")
    mesh.add_argument("--status-socket", default=None, metavar="PATH",
                      help="UNIX socket (mode 0600) for `meshsec mesh` on this host; '' turns it off "
                           "(default: controller.sock in --state-dir)")
    p.add_argument("--max-workers", type=int, default=256, metavar="N",
                   help="watch-port gRPC threads; every Watch stream holds one, one live Watch per node, and "
                        "1/16 of them (2 to 16) stay free for Renew/ReportStatus/GetMesh; the enrol port has its "
                        "own async server and 8 threads (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    from meshsec.version import version_line
    p.add_argument("--version", action="version", version=version_line("meshsec-controller"))
    return p


def _kube_source(args, log: logging.Logger):
    """(KubeNodeSource, TokenReviewer.check or None) from the flags; ValueError/OSError with the reason."""
    from controller.k8s import KubeNodeSource, KubeSourceError, TokenReviewer, api_client, token_sha256
    if args.kube_ca_configmap:
        from controller.k8s import parse_configmap_ref
        parse_configmap_ref(args.kube_ca_configmap)

    if not args.kube_join_token_file and not args.kube_token_review:
        raise ValueError("with --kubernetes/--kubeconfig give --kube-join-token-file FILE (the cluster agents' "
                         "join token) and/or --kube-token-review")
    digest = b""
    if args.kube_join_token_file:
        try:
            token = open(args.kube_join_token_file, encoding="utf-8").read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --kube-join-token-file {args.kube_join_token_file}: {e}") from None
        if len(token) < 16:
            raise ValueError(f"--kube-join-token-file {args.kube_join_token_file}: the token is empty or shorter "
                             "than 16 characters; put a long random token there")
        digest = token_sha256(token)
    try:
        api = api_client(args.kubeconfig, in_cluster=args.kubernetes)
    except KubeSourceError as e:
        raise ValueError(str(e)) from None
    source = KubeNodeSource(api, digest, logger=log.getChild("k8s"))
    review = None
    if args.kube_token_review:
        review = TokenReviewer(api, source, args.kube_service_account, (args.kube_audience,)).check
    source.api = api  # for the CA publisher
    return source, review


def _check(args) -> int:
    from controller.inventory_check import check_file
    from controller.server import split_listen

    try:
        addrs = [split_listen(args.listen)[0], *args.server_name]
        if args.watch_listen:
            addrs.append(split_listen(args.watch_listen)[0])
    except ValueError as e:
        print(f"meshsec-controller: {e}", file=sys.stderr)
        return 2
    errors = check_file(args.check, addrs)
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        print(f"meshsec-controller: {args.check}: {len(errors)} error{'s' if len(errors) > 1 else ''}",
              file=sys.stderr)
        return 2
    print(f"{args.check}: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check:
        return _check(args)
    if not args.inventory:
        parser.error("give --inventory FILE (or --check FILE to validate one)")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("meshsec.controller")
    try:
        host, _ = split_listen(args.listen)
        if args.watch_listen is not None:
            split_listen(args.watch_listen)
        lifetime = parse_duration(args.cert_lifetime)
        ha = None
        if args.etcd_endpoints:
            from controller.leader import HaConfig
            ha = HaConfig.from_args(args, log)
        else:
            for flag in ("etcd_cacert", "etcd_cert", "etcd_key", "etcd_allow_plain_http"):
                if getattr(args, flag):
                    raise ValueError(f"--{flag.replace('_', '-')} needs --etcd-endpoints")
        from controller.metrics import split_hostport
        for flag in ("metrics_listen", "health_listen"):
            if getattr(args, flag) is not None:
                split_hostport(getattr(args, flag), "--" + flag.replace("_", "-"))
        if args.web_listen is not None:
            split_hostport(args.web_listen, "--web-listen")
        if args.web_client_ca is not None:
            try:
                with open(args.web_client_ca, "rb") as f:
                    if b"-----BEGIN CERTIFICATE-----" not in f.read():
                        raise ValueError(f"--web-client-ca {args.web_client_ca}: no PEM certificate in it")
            except OSError as e:
                raise ValueError(f"cannot read --web-client-ca {args.web_client_ca}: {e.strerror}") from None
        if args.max_workers < 4:
            raise ValueError(f"--max-workers {args.max_workers}: use at least 4")
        if lifetime <= 0:
            raise ValueError("--cert-lifetime must be positive")
    except ValueError as e:
        print(f"meshsec-controller: {e}", file=sys.stderr)
        return 2
    node_source = token_review = None
    if args.kubernetes or args.kubeconfig:
        try:
            node_source, token_review = _kube_source(args, log)
        except (ValueError, OSError) as e:
            print(f"meshsec-controller: {e}", file=sys.stderr)
            return 2
    elif args.kube_join_token_file or args.kube_token_review or args.kube_ca_configmap:
        print("meshsec-controller: --kube-join-token-file/--kube-token-review/--kube-ca-configmap need --kubernetes "
              "or --kubeconfig FILE", file=sys.stderr)
        return 2
    from controller.fdlimit import raise_nofile
    _, nofile_line = raise_nofile()  # before any port opens: the per-port connection caps are shares of it
    server = ControllerServer(args.inventory, args.state_dir, node_source=node_source, token_review=token_review, listen=args.listen, watch_listen=args.watch_listen,
                              server_names=args.server_name or default_server_names(host),
                              cert_lifetime=dt.timedelta(seconds=lifetime), logger=log, ha=ha,
                              metrics_listen=args.metrics_listen, health_listen=args.health_listen,
                              max_workers=args.max_workers,
                              mesh_options={"web_listen": args.web_listen,
                                            "web_client_auth": args.web_client_auth == "required",
                                            "web_client_ca": args.web_client_ca,
                                            "status_socket": (str(Path(args.state_dir) / "controller.sock")
                                                              if args.status_socket is None
                                                              else args.status_socket or None)})
    try:
        server.start()
    except InventoryError as e:
        print(str(e), file=sys.stderr)
        return 2
    except OSError as e:
        print(f"meshsec-controller: {e}", file=sys.stderr)
        return 1
    log.info("%s; connections at most %d on the enrol port, %d on the watch port", nofile_line,
             server.enroll_max_connections, server.watch_max_connections)
    publisher = None
    if args.kube_ca_configmap:
        from controller.k8s import CaPublisher, parse_configmap_ref
        ns, name = parse_configmap_ref(args.kube_ca_configmap)
        publisher = CaPublisher(node_source.api, ns, name, server.ca_path.read_text(), logger=log.getChild("k8s"))
        publisher.start()
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watch_host, _ = split_listen(server.watch_listen)
    print(f"meshsec-controller listening on {host}:{server.port} (Enroll, TLS) and {watch_host}:{server.watch_port} "
          f"(Watch, mutual TLS); CA certificate for agents: {server.ca_path}", flush=True)
    while not stopping.wait(1.0):
        pass
    log.info("shutting down")
    if publisher is not None:
        publisher.stop()
    server.stop(grace=2.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
