"""otel-ebpf run | doctor | list | demo"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from . import __version__
from .config import KNOWN_TARGETS, Config, ConfigError, load

EXIT_CONFIG = 2


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (keys as in the README)")
    p.add_argument("--targets", help=f"comma-separated subset of: {', '.join(KNOWN_TARGETS)}")
    p.add_argument("--output", help="console | otlp | jsonl:PATH (default: otlp when "
                                      "OTEL_EXPORTER_OTLP_ENDPOINT is set, else console)")
    p.add_argument("--health-addr", dest="health_addr", help="HOST:PORT for GET /healthz (default 127.0.0.1:9464)")
    p.add_argument("--prometheus-addr", dest="prometheus_addr", help="HOST:PORT serving /metrics (default off)")
    p.add_argument("--binary", action="append", metavar="TARGET=PATH",
                   help="also attach TARGET to this binary (repeatable)")
    p.add_argument("--query-max-bytes", dest="query_max_bytes", type=int)
    p.add_argument("--tls-capture-bytes", dest="tls_capture_bytes", type=int,
                   help="plaintext bytes copied per SSL_read/SSL_write (power of two, 64-16384)")
    p.add_argument("--slow-threshold-ms", dest="slow_threshold_ms", type=float)
    p.add_argument("--sample-ratio", dest="sample_ratio", type=float)
    p.add_argument("--max-spans-per-second", dest="max_spans_per_second", type=int,
                   help="above this rate, sample down (metrics stay exact; 0 = no limit; default 1000)")
    p.add_argument("--capture-raw-query", dest="capture_raw_query", action="store_const", const=True,
                   help="export query text WITH its literals (may expose secrets)")
    p.add_argument("--log-level", dest="log_level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otel-ebpf", description=(
        "OpenTelemetry spans and metrics from unmodified programs, through eBPF."))
    parser.add_argument("--version", action="version", version=f"otel-ebpf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="attach to the targets on this host and export")
    _add_run_options(run)
    doctor = sub.add_parser("doctor", help="check that this host can run the agent, and what it would watch")
    _add_run_options(doctor)
    lst = sub.add_parser("list", help="USDT probes of a binary, or the targets run would attach to")
    lst.add_argument("path", nargs="?", metavar="BINARY")
    _add_run_options(lst)
    demo = sub.add_parser("demo", help="start local servers with load and watch them")
    demo.add_argument("--seconds", type=float, default=20.0)
    demo.add_argument("--targets", default="postgres,mysql,nginx,openssl")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    cli = {k: getattr(args, k, None) for k in (
        "targets", "output", "health_addr", "prometheus_addr", "query_max_bytes", "tls_capture_bytes",
        "slow_threshold_ms", "sample_ratio", "max_spans_per_second", "capture_raw_query", "log_level")}
    binaries: dict[str, list[str]] = {}
    for item in getattr(args, "binary", None) or []:
        target, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--binary {item!r}: expected TARGET=PATH")
        binaries.setdefault(target, []).append(path)
    if binaries:
        cli["binaries"] = binaries
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
        return run_doctor(config)
    if args.command == "list":
        return cmd_list(config, args.path)
    return 1


def cmd_run(config: Config) -> int:
    from .doctor import fatal_problems
    problems = fatal_problems()
    if problems:
        for p in problems:
            print(f"otel-ebpf: cannot run: {p}", file=sys.stderr)
        print("otel-ebpf: `otel-ebpf doctor` explains; `make setup` installs what is missing", file=sys.stderr)
        return 1
    from .pipeline import Agent
    try:
        agent = Agent(config)
    except ValueError as exc:  # e.g. a bad OTEL_EXPORTER_OTLP_PROTOCOL
        print(f"otel-ebpf: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    def stop(signum: int, _frame: object) -> None:
        logging.getLogger("otel_ebpf").info("signal %d: detaching and flushing", signum)
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        agent.run()
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
    from .pipeline import Agent
    agent = Agent(config)
    for target, path, fid in agent.discover():
        ins = target.inspect(path)
        state = "attach" if ins.usable else "skip"
        print(f"{target.name:<9} {state:<6} {ins.mechanism:<7} {path}  (dev {fid.dev}, inode {fid.inode})")
        for note in ins.notes:
            print(f"          note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
