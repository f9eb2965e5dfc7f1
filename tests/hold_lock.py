"""``python -m tests.hold_lock URL``: take the single-runner lock of URL's database, print ``held``, keep it
until killed. Stands for another runner (another process, another container) in the lock tests."""

from __future__ import annotations

import sys
import time

from backfill.connect import connect, create_engine
from backfill.lock import runner_lock
from backfill.retry import limits
from backfill.schema import inspect_target
from backfill.urls import parse_url
from backfill.walk import Settings


def main(url: str) -> None:
    engine = create_engine(parse_url(url))
    conn = connect(engine)
    with limits(Settings().timeouts):
        runner_lock(conn, inspect_target(conn), lambda: connect(engine)).acquire()
    print("held", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(sys.argv[1])
