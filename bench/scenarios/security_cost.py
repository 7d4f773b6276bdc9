"""What the trust checks (issue 16) cost a Reader, beside the attach they are part of.

Publishes a one-key snapshot, then times, in the same run, (a) the checks one
attach adds -- the trusted-uid set plus one ``trust.check_owned`` per segment
(control + data) -- and (b) a whole ``Reader(name)`` + ``close()``. Queries
pay nothing: ``get()`` does no ownership check. Prints three repeats.

    PYTHONPATH=. ./run bench --only security_cost
"""

from __future__ import annotations

import os
import timeit
import uuid

from shmkeyspace import Reader, publisher, segment, trust
from shmkeyspace.builder import ImageBuilder
from shmkeyspace.snapshot import pack_entry


def main(argv=None) -> None:
    name = f"bench-sec-{uuid.uuid4().hex[:8]}"
    with publisher.Publisher(name) as pub:
        b = ImageBuilder()
        b.reset([(b"/s/a", pack_entry(b"/s/a", "v", 1, 1, 1, 0))], 1)
        parts, total = b.parts()
        pub.publish(parts, total, 1, 1)
        path = segment.shm_path(segment.ctrl_name(name))
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)

        def checks() -> None:
            uids = trust.trusted_writer_uids()
            trust.check_owned(st, path, uids, what="control segment", remedy="-")
            trust.check_owned(st, path, {st.st_uid}, what="data segment", remedy="-")

        def attach() -> None:
            Reader(name).close()

        for _ in range(3):
            c = min(timeit.repeat(checks, number=20000, repeat=5)) / 20000 * 1e6
            a = min(timeit.repeat(attach, number=1000, repeat=5)) / 1000 * 1e6
            print(f"checks {c:.2f} us, whole attach {a:.1f} us: {c / a * 100:.2f} % of an attach")
        pub.close(unlink=True)


if __name__ == "__main__":
    main()
