"""The `jfp8` command line: `jfp8 demo | generate | quantize | eval`.

`demo` lives here; the model commands live with the code they drive and are imported lazily
(the CLI is the one jfp8 module allowed to import `models`, and only inside a command).
"""
from __future__ import annotations

import importlib
import sys

# command -> (module, function); each function takes argv (list[str]) and returns an exit code.
_MODEL_COMMANDS = {
    "generate": ("models.generate", "cli"),
    "quantize": ("models.checkpoint", "cli"),
    "eval": ("models.eval", "cli"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0])
        print("commands: demo, " + ", ".join(_MODEL_COMMANDS))
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from jfp8 import demo
        return demo.cli(rest)
    if command in _MODEL_COMMANDS:
        module_name, fn_name = _MODEL_COMMANDS[command]
        return getattr(importlib.import_module(module_name), fn_name)(rest)
    print(f"jfp8: unknown command {command!r}; expected one of demo, "
          + ", ".join(_MODEL_COMMANDS), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
