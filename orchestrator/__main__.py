"""The ``orchestrator`` command, also run as ``python -m orchestrator``.

The cyclic garbage collector is off while the CLI's ~450 modules import: they build
few cycles, and a collection every 700 allocations cost ~8% of every command's start.
``cli.main`` then freezes what was imported and turns collection back on, less often.
"""

import gc
import sys


def main() -> None:
    gc.disable()
    try:
        from orchestrator.cli import main as cli_main
    except KeyboardInterrupt:  # Ctrl-C while the CLI loads: no traceback either
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
