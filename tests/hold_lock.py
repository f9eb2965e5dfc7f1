"""``python -m tests.hold_lock URL``: take the single-runner lock of URL's database, print ``held``, keep it
until killed. Stands for another runner (another process, another container) in the lock tests."""

from __future__ import annotations

import sys
import time

from backfill.connect import connect, create_engine
from backfill.lock import RunnerLock
from backfill.schema import inspect_target
from backfill.urls import parse_url


def main(url: str) -> None:
    conn = connect(create_engine(parse_url(url)))
    RunnerLock(conn, inspect_target(conn)).acquire()
    print("held", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(sys.argv[1])
