"""The ``selfheal`` command: run the agent or the controller, the demo, and operator tools.

Exit codes: 0 ok; 1 failure (for ``status``: degraded); 2 usage; 3 the
controller could not be reached; 78 configuration error (EX_CONFIG, which
systemd's ``RestartPreventExitStatus=78`` treats as permanent).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import selfheal
from selfheal.client import add_client_commands
from selfheal.config import DEFAULT_PATH, Config, load_config
from selfheal.config_checks import STORE_SCHEMES, redact_url
from selfheal.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConfigError, SelfhealError
from selfheal.logs import configure_logging, get_logger

STOP_DEADLINE = 20.0
"""Seconds a process may take to stop cleanly after SIGTERM before it is ended hard."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_OK
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"selfheal: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SelfhealError as exc:
        print(f"selfheal: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfheal", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    for name, func, text in (("agent", _cmd_agent, "run the node agent"),
                             ("controller", _cmd_controller, "run the controller")):
        p = command(name, func, text)
        p.add_argument("--config", type=Path, default=DEFAULT_PATH, help=f"TOML config (default {DEFAULT_PATH})")

    p = command("demo", _cmd_demo, "run a controller, two agents and fault injection on loopback")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--keep", action="store_true", help="keep the demo's temp dir (configs, logs, database)")

    add_client_commands(sub)

    audit = sub.add_parser("audit", help="the audit trail")
    audit_sub = audit.add_subparsers(metavar="ACTION")
    verify = audit_sub.add_parser("verify", help="recompute every incident's hash chain; exit 1 if any is broken")
    verify.add_argument("--config", type=Path, default=DEFAULT_PATH, help="read controller.state_dir from this config")
    verify.add_argument("--db", type=Path, default=None, help="the controller database (overrides --config)")
    verify.add_argument("--store", default=None, metavar="URL",
                        help="a PostgreSQL store, postgresql://... (overrides --config's [store] url)")
    verify.set_defaults(func=_cmd_audit_verify)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a config file without starting anything")
    check.add_argument("path", type=Path)
    check.add_argument("--role", choices=["agent", "controller", "any"], default="any")
    check.set_defaults(func=_cmd_config_check)

    _add_broker_commands(sub)

    p = command("install", _cmd_install, "install the systemd units, users, tmpfiles and polkit rule for this venv")
    p.add_argument("--root", type=Path, default=Path("/"), help="install into this staging tree (default /)")
    p.add_argument("--dry-run", action="store_true", help="print what would be written, write nothing")
    p.add_argument("--role", choices=["all", "agent", "controller"], default="all",
                   help="which services this host runs (default all)")

    command("version", lambda _args: print(f"selfheal {selfheal.__version__}") or EXIT_OK, "print the version")
    return parser


def _load(path: Path, role: str) -> Config:
    config = load_config(path, role=role)  # type: ignore[arg-type]
    configure_logging(config.log)
    return config


def _cmd_agent(args: argparse.Namespace) -> int:
    from agent.app import run_agent  # noqa: PLC0415 - the agent's deps load only when it runs

    config = _load(args.config, "agent")
    return run_until_signalled(lambda stop: run_agent(config, stop=stop, source=args.config), "agent")


def _cmd_controller(args: argparse.Namespace) -> int:
    from controller.app import run_controller  # noqa: PLC0415 - heavy deps load only when it runs

    config = _load(args.config, "controller")
    return run_until_signalled(lambda stop: run_controller(config, stop=stop, source=args.config), "controller")


def _cmd_demo(args: argparse.Namespace) -> int:
    from selfheal.demo import run_demo  # noqa: PLC0415

    return run_demo(duration=args.duration, keep=args.keep)


def _cmd_install(args: argparse.Namespace) -> int:
    from selfheal.install import ROLES, install  # noqa: PLC0415

    roles = ROLES if args.role == "all" else (args.role,)
    return install(root=args.root, roles=roles, dry_run=args.dry_run, out=sys.stdout)


def _cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.path, role=args.role)
    if args.role in ("controller", "any") and config.controller.rulebooks:
        from rules.loader import load_rulebooks  # noqa: PLC0415

        load_rulebooks(config.controller.rulebooks)
    print(f"{args.path}: ok ({len(config.agent.units)} unit(s), mqtt {config.mqtt.url})")
    return EXIT_OK


def _add_broker_commands(sub: Any) -> None:
    broker = sub.add_parser("broker", help="write a Mosquitto configuration with per-node identities and ACLs")
    broker_sub = broker.add_subparsers(metavar="ACTION")
    init = broker_sub.add_parser(
        "init", help="write DIR/mosquitto.conf, passwords, acl and credentials/<user>.password",
        description="Write a Mosquitto configuration that refuses anonymous clients and lets each node "
                    "publish only its own topics. Run it with: mosquitto -c DIR/mosquitto.conf")
    init.add_argument("directory", type=Path, metavar="DIR")
    init.add_argument("--listen", required=True, metavar="HOST:PORT", help="where the broker listens")
    init.add_argument("--node", action="append", default=[], metavar="NAME", help="a node id (repeatable)")
    init.add_argument("--tls", action="store_true", help="TLS listener; generates a CA and server certificate "
                      "unless --ca-cert/--ca-key or --server-cert/--server-key are given")
    init.add_argument("--ca-cert", type=Path, metavar="PEM", help="your CA: sign the server certificate with it")
    init.add_argument("--ca-key", type=Path, metavar="PEM", help="the private key of --ca-cert")
    init.add_argument("--server-cert", type=Path, metavar="PEM", help="your own server certificate, used as is")
    init.add_argument("--server-key", type=Path, metavar="PEM", help="the private key of --server-cert")
    init.add_argument("--san", action="append", default=[], metavar="NAME",
                      help="another DNS name or IP the server certificate names (repeatable)")
    init.add_argument("--broker-user", default="mosquitto", metavar="USER",
                      help="the user a root-started Mosquitto drops to (default mosquitto; '' for none)")
    init.set_defaults(func=_cmd_broker_init)
    add = broker_sub.add_parser("add-node", help="add one node's user, password and ACL to DIR (then SIGHUP "
                                "mosquitto)")
    add.add_argument("node", metavar="NAME")
    add.add_argument("directory", type=Path, metavar="DIR")
    add.add_argument("--rotate", action="store_true", help="give an existing node a new password")
    add.set_defaults(func=_cmd_broker_add_node)


def _cmd_broker_init(args: argparse.Namespace) -> int:
    from selfheal.broker_setup import init_broker  # noqa: PLC0415

    files = init_broker(args.directory, listen=args.listen, nodes=args.node, tls=args.tls, ca_cert=args.ca_cert,
                        ca_key=args.ca_key, server_cert=args.server_cert, server_key=args.server_key,
                        names=args.san, broker_user=args.broker_user or None)
    print(f"wrote {files.conf}, {files.passwords.name}, {files.acl.name} and credentials/ for "
          f"{', '.join(files.credentials)}" + (f"; TLS: {', '.join(p.name for p in files.generated)}"
                                               if files.generated else ""))
    print(f"run: mosquitto -c {files.conf}")
    if files.ca_key is not None:
        print(f"keep {files.ca_key} offline once the certificates are issued; clients need only {files.tls_ca}")
    for user in files.credentials:
        host = "the controller's host" if user == "controller" else f"node {user}'s host"
        print(f"\n# {host}: copy {files.credentials[user]} there (mode 0600, owned by selfheal)"
              + (f" and {files.tls_ca}" if files.tls_ca is not None else "") + "\n" + files.section(user), end="")
    return EXIT_OK


def _cmd_broker_add_node(args: argparse.Namespace) -> int:
    from selfheal.broker_setup import add_node  # noqa: PLC0415

    path, changed = add_node(args.directory, args.node, rotate=args.rotate)
    if not changed:
        print(f"{args.node} is already there, nothing changed ({path}; --rotate gives it a new password)")
        return EXIT_OK
    print(f"added {args.node}: its password is in {path}; copy it to the node and set [mqtt] username = "
          f"\"{args.node}\", password_file = \"<that copy>\"")
    print("reload the broker (SIGHUP): kill -HUP $(pidof mosquitto)  (or systemctl reload mosquitto)")
    return EXIT_OK


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from controller.audit import verify_database, verify_postgres  # noqa: PLC0415

    url: str = args.store or ""
    if args.db and url:
        print("selfheal: --db and --store name different stores: give one", file=sys.stderr)
        return EXIT_USAGE
    path = args.db
    if not path and not url:
        config = load_config(args.config, role="client")
        url = config.store.url
        path = Path(config.controller.state_dir) / "selfheal.sqlite3"
    if url:
        if not url.startswith(tuple(f"{scheme}://" for scheme in STORE_SCHEMES)):
            print("selfheal: --store must be a postgresql:// URL", file=sys.stderr)
            return EXIT_USAGE
        where = redact_url(url)
        incidents, problems = verify_postgres(url)
    elif not path.exists():
        print(f"selfheal: no controller database at {path}", file=sys.stderr)
        return EXIT_FAILURE
    else:
        where = str(path)
        incidents, problems = verify_database(path)
    for problem in problems:
        print(f"incident #{problem.incident_id} entry {problem.entry}: {problem.problem}")
    print(f"{where}: {incidents} incident(s), " + (f"{len(problems)} problem(s)" if problems else "every chain intact"))
    return EXIT_FAILURE if problems else EXIT_OK


def run_until_signalled(start: Callable[[asyncio.Event], Awaitable[None]], name: str) -> int:
    """Run ``start(stop)``; SIGTERM/SIGINT set ``stop``; a hard deadline backs it up."""
    log = get_logger(name)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                return
            log.info("signal.received", signal=signal.Signals(signum).name)
            stop.set()
            loop.call_later(STOP_DEADLINE, _hard_exit, log)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await start(stop)

    failures: list[SelfhealError] = []
    try:
        asyncio.run(runner())
    except* SelfhealError as group:
        failures.extend(e for e in group.exceptions if isinstance(e, SelfhealError))
    for exc in failures:
        log.error("process.failed", process=name, error=str(exc))
    if any(isinstance(e, ConfigError) for e in failures):
        return EXIT_CONFIG
    return EXIT_FAILURE if failures else EXIT_OK


def _hard_exit(log: Any) -> None:
    log.error("shutdown.deadline_exceeded", deadline_s=STOP_DEADLINE)
    os._exit(EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
