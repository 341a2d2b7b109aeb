"""``meshsec-agent``: the node agent (IKEv2 + userspace ESP over TUN).

Two modes:
  --config FILE                       standalone (YAML, see agent.config)
  --controller HOST:PORT --controller-ca FILE --name NODE --join-token-file FILE
                                      enrol with the controller, then follow its view

  --uninstall                         remove the fail-closed state (ip rules, guard table) and exit

Exit status: 0 after SIGTERM/SIGINT (SAs deleted, TUN routes removed; the
fail-closed guard stays unless --fail-open), 2 for bad arguments or
configuration, 1 for a failed preflight or start-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from agent.config import ConfigError, DatapathSettings, load_config
from agent.model import NodeView
from agent.preflight import StartupError, check_cap_net_admin, check_dev_tun, check_ports_free

DEFAULT_STATE_DIR = "/var/lib/meshsec"
DEFAULT_TUN = "meshsec0"
DEFAULT_MTU = 1400
DEFAULT_GUARD_TABLE = 4302
DEFAULT_STORED_VIEW_AFTER = 10.0  # seconds without the controller before a stored view is used

EPILOG = """\
Needs CAP_NET_ADMIN, /dev/net/tun and free UDP ports 500 and 4500 on the local address.
Status: meshsec status --socket PATH.

Standalone configuration (--config FILE), a minimal example:

  name: gw-a
  local_address: 198.51.100.1
  subnets: [10.1.0.0/24]
  auth: {psk_file: /etc/meshsec/psk}      # or {key: K.pem, cert: C.pem, ca: CA.pem}
  peers:
    - name: gw-b
      endpoints: [198.51.100.2]
      subnets: [10.2.0.0/24]

Every key, its default and its meaning: docs/config.md.
Controller mode keeps the last view in --state-dir/view.json and runs on it after a
restart while the controller is unreachable (--stored-view-after)."""

log = logging.getLogger("meshsec.agent")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshsec-agent",
        description="meshsec node agent: IKEv2 (RFC 7296) with every peer, ESP in UDP 4500 (RFC 3948) "
                    "over a TUN device, in userspace.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_argument_group("standalone mode")
    mode.add_argument("--config", metavar="FILE", help="standalone YAML configuration (no controller)")
    ctl = p.add_argument_group("controller mode")
    ctl.add_argument("--controller", metavar="HOST:PORT[,HOST:PORT...]",
                     help="controller gRPC address; several replicas comma-separated (tried in turn)")
    ctl.add_argument("--controller-ca", metavar="FILE", help="PEM CA that signed the controller's certificate")
    ctl.add_argument("--wait-for-ca", action="store_true",
                     help="if --controller-ca does not exist yet (or is empty), wait for it instead of failing: "
                          "in Kubernetes the controller publishes it to a ConfigMap the agent mounts")
    ctl.add_argument("--name", metavar="NODE", help="this node's name in the controller's inventory")
    ctl.add_argument("--join-token-file", metavar="FILE", help="file holding the one-time join token")
    ctl.add_argument("--stored-view-after", type=float, default=DEFAULT_STORED_VIEW_AFTER, metavar="SECONDS",
                     help="when no view came from the controller this many seconds after start, run on the "
                          "last view stored in --state-dir (view.json), if the stored certificate is still "
                          f"valid (default {DEFAULT_STORED_VIEW_AFTER:g}; 0: at once)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                   help=f"key, certificate, CA, last view (default {DEFAULT_STATE_DIR})")
    p.add_argument("--tun-name", default=None, help=f"TUN device name (default {DEFAULT_TUN}, or tun.name in --config)")
    p.add_argument("--mtu", type=int, default=None,
                   help="TUN MTU in bytes (default: tun.mtu in --config, else the underlay MTU minus the largest "
                        "negotiated SA bundle overhead, updated as SAs change)")
    p.add_argument("--mss-clamp", action="store_true", default=None,
                   help="clamp the TCP MSS of SYN / SYN-ACK packets to fit the tunnel (or tun.mss_clamp: true)")
    p.add_argument("--routing-table", type=int, default=4301,
                   help="routing table for the routes into the TUN (default 4301; ip rules at pref "
                        "--rule-priority and +1 are added and removed on exit)")
    p.add_argument("--rule-priority", type=int, default=4300,
                   help="pref of our ip rules (default 4300; we own this pref and the next two)")
    p.add_argument("--guard-table", type=int, default=DEFAULT_GUARD_TABLE,
                   help="fail closed: routing table of blackhole routes for every protected prefix, consulted "
                        "at pref --rule-priority+2, after the TUN routes (default %(default)s). It outlives the "
                        "agent (SIGTERM, crash, kill -9): traffic policy says to PROTECT is dropped, never sent "
                        "in the clear, while no agent runs; a peer that leaves the view stays dropped. Removed "
                        "only by --uninstall (or for a prefix listed in --bypass / a BYPASS policy)")
    p.add_argument("--fail-open", action="store_true",
                   help="OPT-OUT of fail closed: no guard table (an earlier run's is removed); when the agent "
                        "stops, its routes and rules go and protected traffic falls back to the other routes "
                        "(e.g. the CNI's), IN THE CLEAR. Logged as a warning")
    p.add_argument("--uninstall", action="store_true",
                   help="remove every ip rule at --rule-priority..+2 and every route in --routing-table and "
                        "--guard-table (what fail closed leaves behind), then exit; run it on a node after "
                        "stopping the agent for good")
    p.add_argument("--fwmark", type=lambda v: int(v, 0), default=0x4301,
                   help="SO_MARK on our IKE/ESP sockets and (through a local forwarder) our controller connections, "
                        "so they take the main table, never the TUN or the fail-closed guard (default 0x4301; 0: "
                        "no mark, controller connections direct)")
    p.add_argument("--local-address", default=None,
                   help="underlay address to bind UDP 500/4500 on (default: from --config, else the "
                        "source address of the route to the controller)")
    p.add_argument("--control-socket", default="/run/meshsec/agent.sock",
                   help="UNIX socket for `meshsec status` (mode 0600; default /run/meshsec/agent.sock)")
    p.add_argument("--keylog-dir", metavar="DIR", default=None,
                   help="DEBUGGING AID, like SSLKEYLOGFILE: append IKE and ESP keys to DIR/ikev2_decryption_table "
                        "and DIR/esp_sa (Wireshark UAT format; copy them to ~/.config/wireshark/). Anyone who "
                        "reads these files can decrypt the traffic. Off by default.")
    p.add_argument("--bypass", action="append", default=[], metavar="CIDR",
                   help="never send traffic to this prefix through the mesh, even inside a peer's subnet "
                        "(Kubernetes API server, service CIDR, node-local ranges); repeatable. Adds "
                        "`ip rule to CIDR lookup main` at --rule-priority and an SPD BYPASS entry; the "
                        "controller's addresses are bypassed automatically. Removed on exit.")
    p.add_argument("--nat-keepalive", type=float, default=20.0, metavar="SECONDS",
                   help="behind a NAT (detected by IKE NAT-D), send a one-octet NAT-keepalive (RFC 3948 §2.3) "
                        "to each peer's UDP 4500 after this many seconds without other traffic to it "
                        "(default 20; 0 turns them off)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; docs/metrics.md)")
    p.add_argument("--no-offload", action="store_true",
                   help="turn the datapath offloads off (TUN TSO/USO with userspace split and coalescing, "
                        "UDP GSO/GRO): one packet per system call, as for kernels without them")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    from meshsec.version import version_line
    p.add_argument("--version", action="version", version=version_line("meshsec-agent"))
    return p


class _Abandon:
    """A RouteManager in the start-up cleanup list: closing it removes what it added."""

    def __init__(self, routes) -> None:
        self.routes = routes

    def close(self) -> None:
        self.routes.abandon()


def _undo_start(opened: list) -> None:
    """Close what a failed start opened, newest first (no ip rules or routes left behind)."""
    for o in reversed(opened):
        try:
            o.close()
        except Exception as exc:
            log.error("cleanup after a failed start: %s", exc)


def route_source_address(host: str) -> str:
    """Source address the kernel would use towards ``host`` (UDP connect; sends nothing)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def wait_for_file(path: str, stop: threading.Event, interval: float = 1.0, log_every: float = 30.0) -> bool:
    """Poll until ``path`` exists and is not empty (True), or ``stop`` is set (False); logs
    what it waits for at once and every ``log_every`` seconds."""
    last = None
    while not stop.is_set():
        try:
            if os.path.getsize(path) > 0:
                if last is not None:
                    log.info("controller CA %s is there now", path)
                return True
        except OSError:
            pass
        now = time.monotonic()
        if last is None or now - last >= log_every:
            log.warning("waiting for the controller CA at %s (in Kubernetes the controller publishes it to its "
                        "ConfigMap; the kubelet refreshes the volume within a minute or two)", path)
            last = now
        stop.wait(interval)
    return False


def _split_hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise StartupError(f"--controller {addr!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def controller_bypass(controller: str, resolve=socket.getaddrinfo) -> list[str]:
    """Host prefixes (/32, /128) of every controller replica in ``HOST:PORT[,HOST:PORT...]``:
    the agent's own control plane must never be routed into the mesh. Names are resolved
    (``resolve`` as socket.getaddrinfo); an unresolvable name is skipped with a warning."""
    out: list[str] = []
    for part in controller.split(","):
        part = part.strip()
        if not part:
            continue
        host, _port = _split_hostport(part)
        try:
            addrs = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                addrs = sorted({str(ipaddress.ip_address(ai[4][0].split("%")[0]))
                                for ai in resolve(host, None, 0, socket.SOCK_STREAM)})
            except (OSError, ValueError) as exc:
                log.warning("cannot resolve controller %s to bypass it (%s); pass --bypass for it", host, exc)
                addrs = []
        for a in addrs:
            pfx = f"{a}/{32 if ':' not in a else 128}"
            if pfx not in out:
                out.append(pfx)
    return out


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose == 0:
        log.setLevel(logging.INFO)  # start/stop and SA events stay visible
        logging.getLogger("meshsec.runtime").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.uninstall:
        return _uninstall(args)
    standalone = args.config is not None
    if standalone == (args.controller is not None):
        parser.error("give either --config FILE (standalone) or --controller HOST:PORT (controller mode)")
    if not standalone:
        missing = [f for f in ("controller_ca", "name", "join_token_file") if getattr(args, f) is None]
        if missing:
            parser.error("controller mode also needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    if args.controller and "$(" in args.controller:
        parser.error(f"--controller {args.controller!r} holds an unexpanded $(VAR): in Kubernetes the "
                     "Service's *_SERVICE_HOST variable is set only for Services that existed when the pod "
                     "started; the container is restarted and gets it then")
    if args.mtu is not None and not 576 <= args.mtu <= 65535:
        parser.error(f"--mtu {args.mtu}: use 576..65535")
    for b in args.bypass:
        try:
            ipaddress.ip_network(b, strict=True)
        except ValueError as exc:
            parser.error(f"--bypass {b!r}: {exc}; give a prefix without host bits, e.g. 10.96.0.0/12")
    if not 0 <= args.stored_view_after <= 86400:
        parser.error(f"--stored-view-after {args.stored_view_after:g}: use 0..86400 seconds")
    if not (args.nat_keepalive == 0 or 1 <= args.nat_keepalive <= 3600):
        parser.error(f"--nat-keepalive {args.nat_keepalive:g}: use 0 (off) or 1..3600 seconds (20 is typical)")
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"meshsec-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"meshsec-agent: {exc}", file=sys.stderr)
        return 1


def _uninstall(args) -> int:
    from agent.datapath.routes import RouteError, remove_state
    try:
        check_cap_net_admin()
        counts = remove_state(args.routing_table, args.guard_table, args.rule_priority, logger=log)
    except (StartupError, RouteError) as exc:
        print(f"meshsec-agent --uninstall: {exc}", file=sys.stderr)
        return 1
    print(f"meshsec-agent: removed {counts['rules']} ip rules and {counts['routes']} routes "
          f"(tables {args.routing_table}, {args.guard_table}): protected prefixes now follow the other routes")
    return 0


def _run(args) -> int:
    # light modules only until UDP 500/4500 are bound: a peer's IKE_SA_INIT sent while we start
    # then waits in the socket buffer instead of being refused (and retransmitted later); the
    # IKE core, the ESP datapath and pyroute2 load afterwards
    from agent.datapath.control_socket import ControlServer, ControlSocketError
    from agent.datapath.routes import RouteError, RouteManager, enable_ip_forwarding, flush_guard
    from agent.datapath.tun import TunDevice, TunError
    from agent.datapath.udp import RawSocket, UdpError, UdpSocket

    from agent.datapath.view_store import save_view

    client = None
    stored_view = None
    if args.config:
        view, creds, settings = load_config(args.config)
    else:
        settings = DatapathSettings()
        view = NodeView(name=args.name, identity=args.name, subnets=(), peers=())
    local = args.local_address or settings.local_address
    if local is None and not args.config:
        host, _port = _split_hostport(args.controller.split(",")[0].strip())
        try:
            local = route_source_address(host)
        except OSError as exc:
            raise StartupError(f"cannot find a local address towards {host} ({exc.strerror}); pass --local-address")
    if local is None:
        raise StartupError("no local address: set local_address in the config or pass --local-address")
    try:
        ipaddress.ip_address(local)
    except ValueError:
        raise StartupError(f"--local-address {local!r} is not an IP address")
    if view.local_address != local:
        view = dataclasses.replace(view, local_address=local)

    check_cap_net_admin()
    check_dev_tun()
    check_ports_free(local)

    stop_event = threading.Event()
    if not args.config:
        from agent.control import ControllerClient, ControlError
        if args.wait_for_ca:
            wait_for_file(args.controller_ca, stop_event)
        try:
            token = Path(args.join_token_file).read_text().strip()
            ca_pem = Path(args.controller_ca).read_bytes()
        except OSError as exc:
            raise StartupError(f"cannot read {exc.filename}: {exc.strerror}")
        token_path = Path(args.join_token_file)

        def current_token(last=[token]) -> str:  # noqa: B006 - remembers the last good read
            try:
                last[0] = token_path.read_text().strip() or last[0]
            except OSError as exc:
                log.warning("cannot re-read %s (%s); using the token read before", token_path, exc.strerror)
            return last[0]

        address, watch_address, shown_watch = args.controller, None, None
        if args.fwmark:
            # kube-proxy rewrites the Service address to a pod address after our bypass rule has
            # matched: mark the control connections so they take the main table, never the mesh
            from agent.control import default_watch_address
            from agent.controller_path import forward_controller
            try:
                watch = [default_watch_address(a.strip()) for a in args.controller.split(",") if a.strip()]
                shown_watch = ",".join(watch)
                address, watch_address, forwarders = forward_controller(args.controller, watch, args.fwmark,
                                                                        logger=log)
            except (OSError, ValueError) as exc:
                raise StartupError(f"controller path: {exc}")
        try:  # a CA file that is not a PEM certificate fails here
            client = ControllerClient(address, args.name, current_token, Path(args.state_dir), ca_pem,
                                      logger=logging.getLogger("meshsec.control"), watch_address=watch_address,
                                      shown_watch_address=shown_watch)
        except (ControlError, ValueError) as exc:
            raise StartupError(f"controller client: {exc}")
        fallback = _stored_fallback(args.state_dir, args.name)
        log.info("enrolling with controller %s as %s", args.controller, args.name)
        enrolment = _Enrolment(client, stop_event)
        enrolment.start()
        # with a usable stored view, wait only --stored-view-after for the controller
        creds = enrolment.wait(args.stored_view_after if fallback is not None else None)
        if creds is None and fallback is not None:
            stored_view, creds, _saved = fallback
            view = dataclasses.replace(stored_view, local_address=local)
            log.warning("controller %s unreachable: running on the stored view of version %d (saved %s) "
                        "with the stored certificate until it answers", args.controller, view.version,
                        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_saved)))

    bypass = list(dict.fromkeys(args.bypass + (controller_bypass(args.controller) if args.controller else [])))
    tun_name = args.tun_name or settings.tun_name or DEFAULT_TUN
    fixed_mtu = args.mtu or settings.mtu
    mtu = fixed_mtu or DEFAULT_MTU
    keylog = None
    if args.keylog_dir:
        from agent.keylog import KeyLog
        keylog = KeyLog(args.keylog_dir)
        log.warning("key log enabled in %s: traffic keys are written to disk (debugging only)", args.keylog_dir)

    opened = []  # closed again, in reverse, if the start fails (RouteManager: abandon, its ip rules go)
    try:
        offload = not args.no_offload
        if not offload:
            log.warning("--no-offload: TUN and UDP offloads off (one packet per system call)")
        udp500 = UdpSocket(local, 500, mark=args.fwmark, offload=False)  # IKE only: nothing to batch
        opened.append(udp500)
        udp4500 = UdpSocket(local, 4500, mark=args.fwmark, offload=offload)
        opened.append(udp4500)
        try:
            raw_esp = RawSocket(local, 50, mark=args.fwmark)
            opened.append(raw_esp)
        except UdpError as exc:
            raw_esp = None
            log.warning("%s: policies with encapsulation none cannot send or receive", exc)
        tun = TunDevice(tun_name, mtu, offload=offload)
        opened.append(tun)
        if args.fail_open:
            log.warning("--fail-open: when this agent stops, traffic to protected prefixes falls back to the "
                        "other routes IN THE CLEAR (no guard table)")
            flush_guard(args.guard_table, logger=log)
        routes = RouteManager(tun.name, view.subnets, settings.tun_addresses, table=args.routing_table,
                              mark=args.fwmark, rule_priority=args.rule_priority, local_address=local,
                              bypass=bypass, guard_table=None if args.fail_open else args.guard_table)
        opened.append(_Abandon(routes))
        control = ControlServer(args.control_socket, {})
        opened.append(control)
    except (UdpError, TunError, RouteError, ControlSocketError) as exc:
        _undo_start(opened)
        raise StartupError(str(exc))
    enable_ip_forwarding(view.subnets)

    from agent.datapath.runtime import Runtime
    from agent.ike.manager import IkeManager
    ike = IkeManager(view, creds, os.urandom, local_address=local, wall_offset=time.time() - time.monotonic())
    underlay_mtu = routes.underlay_mtu(local)
    auto_mtu = not fixed_mtu and underlay_mtu is not None
    if auto_mtu:
        # ESP AES-GCM tunnel in UDP: 73 bytes over IPv4, 93 over IPv6 (40-byte header); refined per SA.
        # IPv6 needs at least 1280 (RFC 8200 §5) on any link that may carry it.
        v6_underlay = ipaddress.ip_address(local).version == 6
        carries_v6 = v6_underlay or any(n.version == 6 for n in view.subnets) or any(
            n.version == 6 for p in view.peers for n in p.subnets)
        mtu = max(1280 if carries_v6 else 576, underlay_mtu - (93 if v6_underlay else 73))
        try:
            routes.set_mtu(mtu)
        except RouteError as exc:
            _undo_start(opened)
            raise StartupError(str(exc))
    on_stored = client is not None and stored_view is not None
    rt = Runtime(view, ike, tun=tun, udp500=udp500, udp4500=udp4500, local_address=local,
                 routes=routes, keylog=keylog, control=control, awaiting_view=client is not None and not on_stored,
                 raw_esp=raw_esp, underlay_mtu=underlay_mtu, tun_mtu=mtu, auto_mtu=auto_mtu,
                 mss_clamp=bool(args.mss_clamp or settings.mss_clamp), nat_keepalive=args.nat_keepalive,
                 bypass=bypass)
    if on_stored:
        rt.view_source = "stored"

    from agent.peerstate import PeerTracker, install_status
    tracker = PeerTracker(rt)  # per-peer state for `meshsec status`, metrics and the controller's mesh view
    metrics = None
    if args.metrics_listen:
        from agent.metrics import AgentMetrics
        metrics = AgentMetrics(rt, tracker=tracker)
        try:
            port = metrics.serve(args.metrics_listen)
        except (ValueError, OSError) as exc:
            rt.shutdown()
            raise StartupError(f"--metrics-listen {args.metrics_listen}: {exc}")
        log.info("metrics on http://%s:%d/metrics", args.metrics_listen.rpartition(":")[0], port)

    def on_signal(signum, _frame):
        log.info("signal %d: shutting down", signum)
        stop_event.set()
        rt.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    watcher = reporter = None
    if client is not None:
        got_view = threading.Event()
        saved = [stored_view]

        def on_view(v: NodeView) -> None:
            got_view.set()
            if v.local_address != local:
                v = dataclasses.replace(v, local_address=local)  # keeps revoked_serials
            if v.subnets:
                routes.own_subnets = tuple(v.subnets)
                enable_ip_forwarding(v.subnets)
            rt.submit_view(v)
            if v != saved[0]:
                try:
                    save_view(args.state_dir, v)
                    saved[0] = v
                except OSError as exc:
                    log.warning("cannot store view version %d in %s (%s): a restart while the controller is "
                                "down will wait for it", v.version, args.state_dir, exc.strerror or exc)

        # renewed certificates reach IKE on the loop thread (IkeManager.update_credentials)
        client.on_credentials = lambda c: rt.submit_credentials(c)

        def watch_main() -> None:
            if enrolment.is_alive() or enrolment.creds is None:
                # started on stored credentials: the first enrolment result replaces them
                while enrolment.is_alive() and not stop_event.is_set():
                    enrolment.join(0.5)
                if enrolment.creds is not None and enrolment.creds.certificate_chain != creds.certificate_chain:
                    rt.submit_credentials(enrolment.creds)
                elif enrolment.error is not None:
                    log.error("enrolment failed: %s; still running on the stored view", enrolment.error)
            client.watch(on_view, stop_event)

        if not on_stored and args.stored_view_after >= 0:
            def use_stored() -> None:
                if stop_event.wait(args.stored_view_after) or got_view.is_set():
                    return
                fb = _stored_fallback(args.state_dir, args.name)
                if fb is None or got_view.is_set():
                    return
                sv = dataclasses.replace(fb[0], local_address=local)
                log.warning("no view from controller %s after %gs: running on the stored view of version %d "
                            "(saved %s) until it answers", args.controller, args.stored_view_after, sv.version,
                            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(fb[2])))
                saved[0] = fb[0]
                rt.submit_stored_view(sv)

            threading.Thread(target=use_stored, name="stored-view", daemon=True).start()
        watcher = threading.Thread(target=watch_main, name="controller-watch", daemon=True)
        watcher.start()
        from agent.status_report import StatusReporter
        reporter = StatusReporter(client, rt, tracker)  # ReportStatus: periodic and on change
        threading.Thread(target=reporter.run, args=(stop_event,), name="status-report", daemon=True).start()
    install_status(control, rt, tracker, reporter)
    log.info("meshsec-agent %s up: %s on %s, TUN %s mtu %d, %d peers", view.name,
             "standalone" if args.config else f"controller {args.controller}", local, tun.name, mtu,
             len(view.peers))
    rt.run()
    stop_event.set()
    if watcher is not None:
        watcher.join(timeout=2.0)
    if rt.fatal:
        print(f"meshsec-agent: fatal: {rt.fatal}; stopped (IKE_SAs deleted, TUN routes removed"
              f"{'' if args.fail_open else '; fail-closed guard kept'})", file=sys.stderr)
        return 1
    return 0


class _Enrolment(threading.Thread):
    """``client.enroll`` in the background, so a stored view can be used while the
    controller does not answer. ``creds`` / ``error`` once done."""

    def __init__(self, client, stop: threading.Event) -> None:
        super().__init__(name="enrolment", daemon=True)
        self.client, self.stop = client, stop
        self.creds = None
        self.error: Exception | None = None

    def run(self) -> None:
        from agent.control import ControlError
        try:
            self.creds = self.client.enroll(stop=self.stop)  # retries with backoff, logging each attempt
        except ControlError as exc:
            self.error = exc

    def wait(self, limit: float | None):
        """Credentials once enrolled; None if ``limit`` seconds passed first (None: no limit).
        StartupError for a permanent enrolment failure."""
        deadline = None if limit is None else time.monotonic() + limit
        while self.is_alive() and (deadline is None or time.monotonic() < deadline):
            self.join(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic())))
        if self.error is not None:
            raise StartupError(f"enrolment failed: {self.error}")
        return self.creds


def _stored_fallback(state_dir: str, name: str):
    """(view, credentials, saved_at) to run on while the controller is down, or None (logged:
    no stored view, or the stored certificate is not valid now: then we wait for it)."""
    from agent.datapath.view_store import StoredStateError, load_view, stored_credentials
    try:
        view, saved_at = load_view(state_dir, name)
        creds, _not_after = stored_credentials(state_dir, name, time.time())
    except StoredStateError as exc:
        log.info("no stored view to fall back on: %s", exc)
        return None
    return view, creds, saved_at


if __name__ == "__main__":
    sys.exit(main())
