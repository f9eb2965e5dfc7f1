"""The command's entry point: ``mlflow-gateway-backfill`` and ``python -m backfill``.

Signal handling comes first, before the CLI's imports (signals.py): from the first line on, a SIGINT or
SIGTERM ends the command with exit 7, never the process by the signal itself.
"""

from backfill import output, signals


def main() -> None:
    signals.install()
    from backfill import cli  # after install(): these imports take a second or more on a busy machine

    try:
        cli.main()
    finally:
        signals.ignore()
        output.flush()


if __name__ == "__main__":
    main()
