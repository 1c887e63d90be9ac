"""The command-line tools, apart from the library: `python -m mmqa <tool> [args]` (or `mmqa <tool>`
once the package is installed). Each tool is one module here with a `main()`; `TOOLS` is the one
list of them, and an unknown name is an error that lists the valid ones."""

from __future__ import annotations

import importlib
import sys

# tool -> what it does (the module mmqa.cli.<tool> holds it)
TOOLS = {
    "evaluate": "evaluate a bundle on a dataset split (Hydra: bundle=... data=... split=...)",
    "breakdown": "accuracy of a bundle by question family and phrasing, and answer confusions",
    "index": "embed a folder of images into a search index for the demo",
    "report": "the ablation report of one or more multirun folders",
    "compress": "a cheaper copy of a bundle: int8, pruned (Hydra: bundle=... method=...)",
    "inspect": "attention maps of one question, and how faithful each map is (Hydra: bundle=... task=...)",
}


def usage() -> str:
    width = max(map(len, TOOLS))
    lines = [f"  {name:<{width}}  {what}" for name, what in TOOLS.items()]
    return "usage: python -m mmqa <tool> [args]   (python -m mmqa <tool> --help for its options)\n\ntools:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    tool, rest = argv[0], argv[1:]
    if tool not in TOOLS:
        print(f"error: unknown tool {tool!r}; valid: {', '.join(TOOLS)}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"mmqa.cli.{tool}")
    sys.argv = [f"mmqa {tool}", *rest]  # Hydra's tools read their overrides from sys.argv
    return module.main() or 0
