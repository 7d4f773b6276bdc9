"""The query kernels: which implementations this installation offers, and loading them.

Owns the choice between the compiled extension (``_speedups``, set up here once
with the Entry type, CorruptSegmentError, the unpacker and xxh3) and the Python
kernels of ``snapshot.ImageView``: :data:`IMPLEMENTATIONS`, :data:`compiled` and
the per-implementation kernel table :data:`IMPLS`. A kernel answers from one
image and knows nothing of the seqlock (reader.py retries around it). The
writer side (builder.py) runs its O(n) kernels from :data:`compiled` too, or the
Python ones below, so neither side imports the other.

Promises: both implementations give the same answers (the property, torture and
fuzz tests run on each); ``SHMKEYSPACE_PURE_PYTHON=1`` switches the compiled one off.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, NamedTuple, Optional

from xxhash import xxh3_64_intdigest

from .errors import CorruptSegmentError
from .snapshot import ImageView, unpackb
from .views import Entry, Key, make_entry

try:
    if os.environ.get("SHMKEYSPACE_PURE_PYTHON", "") not in ("", "0"):
        raise ImportError("SHMKEYSPACE_PURE_PYTHON is set")
    from . import _speedups
except ImportError:  # not built (no compiler at install time) or switched off
    _speedups = None

_new = tuple.__new__

# -- the two implementations of the query kernels --------------------------------------
# A kernel answers from one image (snapshot.ImageView, or its compiled twin
# _speedups.Image) and knows nothing of the seqlock.


def _py_lookup(kern: ImageView, key: Key) -> Optional[Entry]:
    lst = kern.lookup(key)
    return None if lst is None else _new(Entry, lst)


def _py_range(kern: ImageView, lo: bytes, hi: Optional[bytes]) -> List[Entry]:
    return list(map(make_entry, kern.range(lo, hi)))


def _py_kernel(view: ImageView) -> Any:
    return view


class Impl(NamedTuple):
    """The kernels of one implementation."""

    lookup: Callable[..., Optional[Entry]]
    range: Callable[..., List[Entry]]
    kernel: Callable[[ImageView], Any]
    # The same entries as msgpack bytes (TypedView decodes them itself).
    lookup_raw: Callable[..., Optional[bytes]]
    range_raw: Callable[..., bytes]


#: Per implementation name, its kernels.
IMPLS = {"python": Impl(_py_lookup, _py_range, _py_kernel, ImageView.lookup_raw, ImageView.range_raw)}
if _speedups is not None:
    _speedups.setup(Entry, CorruptSegmentError, unpackb, xxh3_64_intdigest)
    IMPLS["c"] = Impl(
        _speedups.Image.lookup,
        _speedups.Image.range,
        _speedups.Image.of,
        _speedups.Image.lookup_raw,
        _speedups.Image.range_raw,
    )

#: The implementations this installation offers: "c" (the compiled extension) if it
#: is built and SHMKEYSPACE_PURE_PYTHON is not set, and always "python".
IMPLEMENTATIONS = tuple(sorted(IMPLS))
#: The compiled extension, set up (None: not built, or SHMKEYSPACE_PURE_PYTHON=1).
#: builder.py runs its O(n) kernels from it too.
compiled = _speedups
