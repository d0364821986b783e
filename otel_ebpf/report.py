"""What `doctor` and `list` say about targets: the binaries discovery picks, which probes
and protocols each offers, what the selectors left out, the USDT catalog, and (with
--timings) where each attach spends its time."""
from __future__ import annotations

import time

from . import elf
from .attacher import READY, Attacher
from .config import Config
from .discovery import find_binaries
from .targets import registry


def print_targets(config: Config, timings: bool = False) -> list[str]:
    """Print the report; returns problems that would stop the agent (a bad catalog file)."""
    from .usdt_catalog import CatalogError, load_catalog
    problems: list[str] = []
    try:
        catalog = load_catalog(config.usdt_catalog)
    except CatalogError as exc:
        print(f"USDT catalog: {exc}")
        problems.append("USDT catalog")
        catalog = None
    names = config.targets or tuple(registry.available())
    targets = [registry.create(n) for n in names if n != "usdt" or catalog is not None]
    elf.set_cache_dir(None if config.cache_dir == "off" else (config.cache_dir or elf.default_cache_dir()))
    warnings: list[str] = []
    selection = find_binaries(targets, config, lambda _key, msg: warnings.append(msg))
    print("targets:")
    for message in warnings:
        print(f"  warning: {message}")
    for target in targets:
        mine = [(p, f) for t, p, f in selection.binaries if t is target]
        if not mine:
            where = ", ".join(target.candidate_paths()) or "running processes"
            print(f"  {target.name}: no binary found (looked in {where})")
        for path, _fid in mine:
            t0 = time.monotonic()
            ins = target.inspect(path)
            print(f"  {target.name}: {path} via {ins.mechanism}: {'will attach' if ins.usable else 'cannot attach'}"
                  + (f"  [inspected in {time.monotonic() - t0:.3f} s]" if timings else ""))
            for label, covered in ins.protocols.items():
                print(f"      {'covered' if covered else 'NOT covered'}: {label}")
            for label, present in ins.probes.items():
                print(f"      {'+' if present else '-'} {label}")
            for note in ins.notes:
                print(f"      note: {note}")
    if selection.pids is not None:
        mode = "all processes but" if selection.deny else "only"
        print(f"selectors: the kernel watches {mode} pids {sorted(selection.pids)} (and their children)")
    for what, why in selection.skipped:
        print(f"  skipped: {what}: {why}")
    if catalog is not None:
        print(f"USDT catalog: {len(catalog.pairs)} pairs from {', '.join(catalog.files) or 'no file'}")
        for pair in catalog.pairs:
            print(f"  {pair.name}: {pair.provider}:{pair.start} -> {pair.provider}:{pair.done} "
                  f"({pair.source}); {pair.describe()}")
    if timings:
        print_timings(config, selection.binaries)
    return problems


def print_timings(config: Config, binaries: list) -> None:
    """Plan, compile and attach every unit as `run` would (then detach), timed."""
    attacher = Attacher(config)
    units = attacher.new_units(binaries)
    print("timings (s):  elf  plan  compile  attach  target binary")
    total = time.monotonic()
    for unit in units:
        t0 = time.monotonic()
        try:
            info = elf.elf_info(unit.path)
            cached = " (cached)" if getattr(info, "from_cache", False) else ""
        except elf.ElfError:
            cached = " (unreadable)"
        elf_s = time.monotonic() - t0
        attacher.attach(unit)
        t = unit.timings
        state = "" if unit.state == READY else f"  FAILED: {unit.error}"
        print(f"  {elf_s:6.3f}{cached:>9} {t.get('plan', 0):5.3f} {t.get('compile', 0):8.3f} "
              f"{t.get('attach', 0):7.3f}  {unit.target.name} {unit.path}{state}")
    attacher.detach_all()
    attacher.close_all()
    print(f"  total {time.monotonic() - total:.3f} s (one after the other; `run` compiles side by side)")
