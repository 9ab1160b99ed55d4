"""The ``orchestrator`` command, also run as ``python -m orchestrator``."""

import sys


def main() -> None:
    try:
        from orchestrator.cli import main as cli_main
    except KeyboardInterrupt:  # Ctrl-C while the CLI loads: no traceback either
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
