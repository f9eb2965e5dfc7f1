"""Child-process entry: ``python -m bench.child [--variant NAME] CLI-ARGS...`` runs the real CLI.

With ``--variant``, one of :mod:`bench.variants`' prototype changes is applied to the backfill package
first, so a proposal is measured through exactly the code path users run.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    if argv[:1] == ["--variant"]:
        from bench import variants

        variants.apply(argv[1])
        argv = argv[2:]
    from backfill.cli import cli

    cli.main(args=argv, prog_name="mlflow-gateway-backfill")


if __name__ == "__main__":
    main(sys.argv[1:])
