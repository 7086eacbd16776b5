"""List the benchmarks, or run one: `python -m benchmarks [NAME [OPTIONS]]`.

Every module `benchmarks/bench_NAME.py` is a benchmark; its `main(argv)` takes the options.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
PREFIX = "bench_"


def available() -> dict[str, str]:
    """Return the benchmark names, each with the first line of its module docstring."""
    names = {}
    for path in sorted(FOLDER.glob(f"{PREFIX}*.py")):
        name = path.stem.removeprefix(PREFIX)
        names[name] = _summary(path)
    return names


def _summary(path: Path) -> str:
    """Return the first docstring line of a module file without importing it."""
    import ast

    docstring = ast.get_docstring(ast.parse(path.read_text()))
    return docstring.splitlines()[0] if docstring else ""


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not arguments or arguments[0] in ("-h", "--help", "list"):
        print("usage: python -m benchmarks NAME [OPTIONS]   (NAME --help lists the options)\n")
        for name, summary in names.items():
            print(f"  {name:<12} {summary}")
        return 0
    name = arguments[0]
    if name not in names:
        print(f"unknown benchmark {name!r}: expected one of {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{PREFIX}{name}")
    module.main(arguments[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
