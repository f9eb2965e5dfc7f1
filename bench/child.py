"""Child-process entry: ``python -m bench.child [--variant NAME] CLI-ARGS...`` runs the real CLI.

With ``--variant``, one of :mod:`bench.variants`' prototype changes is applied to the backfill package
first, so a proposal is measured through exactly the code path users run.

Each batch that commits adds one line to stderr (``bench-batch: [hi, scanned, inserted, seconds, size,
rss_kb]``: the batch's upper experiment id, sourceType rows it covered, rows inserted, its seconds as the
walk measures them, the batch size it was asked for, and the process's resident set size after it), and at
exit the child prints its own peak RSS (``VmHWM`` of /proc/self/status). ``wait4``/``RUSAGE_CHILDREN``
would not do for the peak: Linux carries the parent's high-water mark across fork and exec into the
child's ``ru_maxrss``, so a child of a 200 MB benchmark process would report 200 MB.
"""

from __future__ import annotations

import atexit
import json
import resource
import sys
from typing import Any

RSS_PREFIX = "bench-peak-rss-kb:"
BATCH_PREFIX = "bench-batch:"


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_kb() -> int:
    """This process's peak resident set size in KiB since its exec."""
    peak = _status_kb("VmHWM")
    # Not Linux: ru_maxrss (which includes the pre-exec image).
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _report_rss() -> None:
    print(f"{RSS_PREFIX} {peak_rss_kb()}", file=sys.stderr, flush=True)


def _record_batches() -> None:
    """Report every committed batch on stderr (see the module docstring)."""
    from backfill import walk

    step = walk.Walk._step

    def recorded(self: walk.Walk, lo: int) -> Any:
        size = self.size
        result = step(self, lo)
        if result is not None:
            hi, scanned, added, elapsed = result
            line = [hi, scanned, added, round(elapsed, 5), size, _status_kb("VmRSS") or 0]
            print(BATCH_PREFIX, json.dumps(line), file=sys.stderr, flush=True)
        return result

    walk.Walk._step = recorded  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    atexit.register(_report_rss)
    if argv[:1] == ["--variant"]:
        from bench import variants

        variants.apply(argv[1])
        argv = argv[2:]
    _record_batches()
    from backfill.cli import cli

    cli.main(args=argv, prog_name="mlflow-gateway-backfill")


if __name__ == "__main__":
    main(sys.argv[1:])
