"""Check every number in the README's result tables against the committed summaries they come from.

    python scripts/check_readme.py            # README.md of this checkout; exit 1 and a list when one is off

A result table names its sources on the line before it (blank lines between are allowed):

    <!-- numbers: outputs/reference/matched/summary.csv outputs/reference/matched/seed0/metrics.json -->
    | model | test ppl | ... |

Every number in the table's body (backticked text such as `hard_example_ratio=0.5` is a config key, not a
result, and whole numbers in the first column name the row, e.g. "dense 2-layer model": both are skipped) must be one of the sources' numbers written with one rounding rule: the README shows a
value v with the digits it shows, so "87.15" must be f"{v:.2f}" for some v, "5.09e12" f"{v:.2e}", "+19.0%"
f"{v:+.1f}" of a percentage (or of 100 x a share), "600" f"{v:.0f}". Numbers are rounded once, from the raw
values in the sources (a README number taken from another rounded number fails when the two roundings
disagree). Sources are JSON (every numeric leaf) and CSV (every numeric cell).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import Iterable, List, Set, Tuple

MARKER = re.compile(r"^<!--\s*numbers:\s*(.+?)\s*-->", re.MULTILINE)
NUMBER = re.compile(r"(?<![\w.])([-+]?)(\d+(?:\.\d+)?)(?:e([-+]?\d+))?(%?)(?![\w.])")


def leaves(obj) -> Iterable[float]:
    """Every number in a parsed JSON document (booleans left out)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from leaves(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def source_values(root: Path, names: List[str]) -> List[float]:
    out: List[float] = []
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"README names {name} as a source of numbers, and it does not exist")
        if path.suffix == ".json":
            out += leaves(json.loads(path.read_text()))
        elif path.suffix == ".csv":
            for row in csv.reader(path.open()):
                for cell in row:
                    try:
                        out.append(float(cell))
                    except ValueError:
                        pass
        else:
            raise ValueError(f"{name}: only .json and .csv sources can be checked")
    return out


def renderings(value: float, sign: str, mantissa: str, exponent: str | None, percent: str) -> Set[str]:
    """How `value` reads with the digits a README number shows (its sign, decimals, exponent, percent)."""
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    candidates = [value, 100 * value] if percent else [value]
    out = set()
    for v in candidates:
        if exponent is not None:
            text = f"{v:.{decimals}e}"
            m, e = text.split("e")
            out.add(f"{m}e{int(e)}")
        else:
            out.add(f"{v:+.{decimals}f}" if sign == "+" else f"{v:.{decimals}f}")
    return out


def table_numbers(lines: List[str]) -> Iterable[Tuple[int, str, Tuple[str, str, str | None, str]]]:
    """(line number, text, parts) of each number in a table's body rows (header and separator skipped)."""
    for offset, line in enumerate(lines):
        if offset < 2:  # the header and the |---| row
            continue
        cells = re.sub(r"`[^`]*`", "", line).strip().strip("|").split("|")
        for column, cell in enumerate(cells):
            for m in NUMBER.finditer(cell):
                if column == 0 and not ("." in m.group(2) or m.group(3) or m.group(4)):
                    continue  # a whole number in the label column names the row (a 2-layer model, seed 0)
                yield offset, m.group(0), (m.group(1), m.group(2), m.group(3), m.group(4))


def check(readme: Path, root: Path) -> List[str]:
    """Problems found: one line per README number that no source value renders to, and per bad marker."""
    lines = readme.read_text().splitlines()
    problems: List[str] = []
    i = 0
    while i < len(lines):
        m = MARKER.search(lines[i])
        i += 1
        if not m:
            continue
        start = i
        while start < len(lines) and not lines[start].startswith("|"):
            if lines[start].strip() and not lines[start].lstrip().startswith("<!--"):
                break
            start += 1
        if start >= len(lines) or not lines[start].startswith("|"):
            problems.append(f"README line {i}: a numbers marker with no table after it")
            continue
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        names = m.group(1).split()
        values = source_values(root, names)
        for offset, text, (sign, mantissa, exponent, percent) in table_numbers(lines[start:end]):
            wanted = f"{sign if sign == '-' else ''}{mantissa}" + (f"e{int(exponent)}" if exponent else "")
            if sign == "+":
                wanted = "+" + wanted
            if not any(wanted in renderings(v, sign, mantissa, exponent, percent) for v in values):
                problems.append(f"README line {start + offset + 1}: {text} is not in {', '.join(names)} "
                                f"(rounded as shown)")
        i = end
    return problems


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parents[1]
    readme = Path(argv[0]) if argv else root / "README.md"
    problems = check(readme, root)
    for p in problems:
        print(p)
    tables = len(MARKER.findall(readme.read_text()))
    print(f"{tables} tables checked: {'all numbers match' if not problems else f'{len(problems)} do not'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
