"""Child-process entry: ``python -m bench.child [--variant NAME] CLI-ARGS...`` runs the real CLI.

With ``--variant``, one of :mod:`bench.variants`' prototype changes is applied to the backfill package
first, so a proposal is measured through exactly the code path users run.

At exit the child prints its own peak RSS (``VmHWM`` of /proc/self/status) to stderr as the last line.
``wait4``/``RUSAGE_CHILDREN`` would not do: Linux carries the parent's high-water mark across fork and
exec into the child's ``ru_maxrss``, so a child of a 200 MB benchmark process would report 200 MB.
"""

from __future__ import annotations

import atexit
import resource
import sys

RSS_PREFIX = "bench-peak-rss-kb:"


def peak_rss_kb() -> int:
    """This process's peak resident set size in KiB since its exec."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: includes the pre-exec image


def _report_rss() -> None:
    print(f"{RSS_PREFIX} {peak_rss_kb()}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    atexit.register(_report_rss)
    if argv[:1] == ["--variant"]:
        from bench import variants

        variants.apply(argv[1])
        argv = argv[2:]
    from backfill.cli import cli

    cli.main(args=argv, prog_name="mlflow-gateway-backfill")


if __name__ == "__main__":
    main(sys.argv[1:])
