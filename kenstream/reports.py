"""What the command line prints: sizes, the info report, the verify table.

Names, paths and sources come from files a stranger may have written, so every one is
passed through :func:`printable` before it reaches the terminal.
"""

from __future__ import annotations

from .text import printable


def human(n: float) -> str:
    """``1234567`` -> ``'1.2 MB'`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _number(value) -> str:
    """A recorded number as people read it: six significant digits (a --size search's keep
    is 0.0157544, not 0.015754414425381908)."""
    return f"{value:.6g}" if isinstance(value, float) else printable(value)


def _name_width(names, least: int = 40, most: int = 100) -> int:
    """Width of a table's name column: its longest name, within [least, most] (a longer
    name pushes only its own line)."""
    return min(most, max([least, *(len(printable(n)) for n in names)]))


def _share(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}" if whole else "-"


def selection(sel: dict) -> str:
    """A recorded selection as ``info`` and a rebuilt model's card state it: rule, keep,
    tie mode and budget."""
    rule = f"k={sel.get('k')}" if sel.get("k") is not None else f"keep={_number(sel.get('keep'))}"
    # Ties break equal distances or scores; random's draws in a row have none (a budget
    # across rows still has its cut bin), so there the recorded mode means nothing.
    budget = sel.get("budget", "row")
    ties = "" if sel.get("method") == "random" and budget == "row" \
        else f" ties={printable(sel.get('ties'))}"
    return f"{printable(sel.get('method'))} {rule}{ties} budget={printable(budget)}"


def print_info(report: dict, tensors: bool = False) -> None:
    """The ``kenstream info`` report: totals, one line per layer, and with ``tensors`` one
    line per tensor (bytes split into positions and values, and the ratio to the
    fine-tune's own bytes)."""
    t = report["totals"]
    print(f"diff: {printable(report['path'])}   format {report.get('format_version')}")
    print(f"base: {printable(report['base'])}   fine-tune: {printable(report['finetuned'])}")
    coding = report.get("coding")
    print(f"selection: {selection(report['selection'])}"
          + (f"   coding: zstd level {coding['level']}, frames of {coding['frame_elems']:,} "
             "values" if coding else ""))
    print(f"parameters: {t['params']:,}   selected: {t['selected']:,}   kept: {t['kept']:,}   "
          f"reset: {t['reset']:,}" + (f" ({_share(t['reset'], t['selected'])}% of selected)"
                                      if t["selected"] else ""))
    print(f"diff bytes: {human(t['diff_bytes'])} (positions {human(t['positions_bytes'])}, "
          f"values {human(t['values_bytes'])})   fine-tune bytes: "
          f"{human(t['finetuned_bytes'])}   ratio: {t['diff_to_finetuned']:.3f}")
    print(f"{'layer':>8} {'params':>14} {'kept %':>8} {'bytes':>12}")
    for layer, row in report["layers"].items():
        print(f"{printable(layer):>8} {row['params']:>14,} "
              f"{_share(row['kept'], row['selected']):>8} {human(row['bytes']):>12}")
    if not tensors:
        print("(kenstream info DIFF --tensors lists every tensor)")
        return
    w = _name_width(row["name"] for row in report["tensors"])
    print(f"{'tensor':<{w}} {'encoding':>9} {'kept %':>7} {'positions':>11} {'values':>11} "
          f"{'ratio':>6}")
    for row in report["tensors"]:
        kept = _share(row["kept"], row["params"]) if row["encoding"] != "unchanged" else "-"
        print(f"{printable(row['name']):<{w}} {row['encoding']:>9} {kept:>7} "
              f"{human(row['positions_bytes']):>11} {human(row['values_bytes']):>11} "
              f"{row['ratio']:>6.3f}")


def print_verify(report: dict) -> None:
    """One line per tensor: kept fraction and relative reconstruction error."""
    w = _name_width(report["tensors"])
    print(f"{'tensor':<{w}} {'kept':>7} {'rel.err':>9}")
    for name, row in report["tensors"].items():  # in numeric order (engine.verify)
        err = row.get("rel_error")
        print(f"{printable(name):<{w}} {row['kept_fraction']:>7.3f} "
              + (f"{err:>9.4f}" if err is not None else f"{'-':>9}"))
