"""otel-ebpf run | doctor | list | demo"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from . import __version__
from .config import SETTINGS, Config, ConfigError, load, parse_binaries

EXIT_CONFIG = 2


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (keys as in the README)")
    group = p.add_argument_group("settings (each also a config file key and an OTEL_EBPF_<KEY> variable)")
    for s in SETTINGS:
        if s.key == "binaries":
            group.add_argument("--binary", action="append", metavar="TARGET=PATH",
                               help=f"{s.help} [{s.env}=TARGET=PATH,...]")
        elif s.key in ("capture_raw_query", "sdk_disabled"):
            group.add_argument(s.option, dest=s.key, action="store_const", const=True, help=f"{s.help} [{s.env}]")
        else:
            group.add_argument(s.option, dest=s.key, metavar=s.metavar or None, help=f"{s.help} [{s.env}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otel-ebpf", description=(
        "OpenTelemetry spans and metrics from unmodified programs, through eBPF."))
    parser.add_argument("--version", action="version", version=f"otel-ebpf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="attach to the targets on this host and export")
    _add_run_options(run)
    doctor = sub.add_parser("doctor", help="check that this host can run the agent, and what it would watch")
    doctor.add_argument("--timings", action="store_true", help="plan, compile and attach each binary, timed")
    _add_run_options(doctor)
    lst = sub.add_parser("list", help="USDT probes of a binary, or the targets run would attach to")
    lst.add_argument("path", nargs="?", metavar="BINARY")
    _add_run_options(lst)
    demo = sub.add_parser("demo", help="start local servers with load and watch them")
    demo.add_argument("--seconds", type=float, default=20.0)
    demo.add_argument("--targets", default="postgres,mysql,nginx,openssl")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    cli = {s.key: getattr(args, s.key, None) for s in SETTINGS if s.key != "binaries"}
    items = getattr(args, "binary", None) or []
    if items:
        cli["binaries"] = parse_binaries(items, "--binary")
    return load(cli, getattr(args, "config", None))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo
            return run_demo(seconds=args.seconds, targets=args.targets.split(","))
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"otel-ebpf: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        return cmd_run(config)
    if args.command == "doctor":
        from .doctor import run_doctor
        return run_doctor(config, timings=args.timings)
    if args.command == "list":
        return cmd_list(config, args.path)
    return 1


def cmd_run(config: Config) -> int:
    from .doctor import fatal_problems
    problems = [] if config.sdk_disabled else fatal_problems()
    if problems:
        for p in problems:
            print(f"otel-ebpf: cannot run: {p}", file=sys.stderr)
        print("otel-ebpf: `otel-ebpf doctor` explains what is missing and how to get it", file=sys.stderr)
        return 1
    from .agent import Agent
    from .usdt_catalog import CatalogError
    try:
        agent = Agent(config)
    except (ValueError, CatalogError) as exc:  # e.g. a bad OTEL_EXPORTER_OTLP_PROTOCOL or catalog file
        print(f"otel-ebpf: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    def stop(signum: int, _frame: object) -> None:
        logging.getLogger("otel_ebpf").info("signal %d: detaching and flushing", signum)
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        agent.run()
    except CatalogError as exc:  # a catalog entry that does not fit a binary on this host
        print(f"otel-ebpf: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # e.g. the health port is taken
        print(f"otel-ebpf: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_list(config: Config, binary: str | None) -> int:
    from .elf import ElfError, elf_info
    if binary:
        try:
            info = elf_info(binary)
        except ElfError as exc:
            print(f"otel-ebpf: {exc}", file=sys.stderr)
            return 1
        if not info.probes:
            print(f"{binary}: no USDT probes (.note.stapsdt absent)")
        for p in info.probes:
            sem = f" semaphore={p.semaphore_offset:#x}" if p.semaphore else ""
            print(f"usdt:{binary}:{p.provider}:{p.name}  [{p.arg_string}]{sem}")
        return 0
    from .discovery import find_binaries
    from .targets import registry
    targets = [registry.create(n) for n in (config.targets or registry.available())]
    for target, path, fid in find_binaries(targets, config, lambda _k, msg: print(f"warning: {msg}")).binaries:
        ins = target.inspect(path)
        state = "attach" if ins.usable else "skip"
        print(f"{target.name:<9} {state:<6} {ins.mechanism:<7} {path}  (dev {fid.dev}, inode {fid.inode})")
        for note in ins.notes:
            print(f"          note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
