"""Long-lived, acyclic objects of the core kept out of the cyclic garbage collector.

A node holds one ``Bucket`` per live key, and a bucket that other replicas touched
holds their entries in one list beside it: a million keys are one to two million
container objects that live as long as their keys. CPython's cyclic collector walks
every tracked container in a full (generation 2) collection, and it runs one each
time the objects that survived into generation 2 grew by a quarter: on a node whose
keys arrive at runtime, a pause of ~0.2 s per million buckets, ~0.7 s when each also
holds a peer's entries (idle, in-process: ``benchmarks/gc_pause.py``), during which
the node answers nothing. ``gc.freeze()`` at start-up (node/serve.py) moves only what
was restored then.

None of these can be part of a reference cycle: a bucket refers to its config (a
msgspec struct of numbers and strings), strings, numbers, tuples of numbers and the
entries list, the list to strings, numbers and tuples of numbers, and the limiter's map
of buckets to keys and buckets; nothing refers back. So reference counting alone frees
them, and ``untrack`` takes them out of the collector's walks when they are made
(``core/bucket.py``), and the map after every store into it (``core/limiter.py``: a
dict tracks itself again then). With them out, CPython's trigger for a full collection
fires far more often: a ``serve`` process paces it (``node/gcpacing.py``).

This file is the reference and the fallback: ``untrack`` returns its argument and
does nothing else. ``make install`` compiles ``heap.c`` beside it (setup.py), which
Python imports before this file; that one calls ``PyObject_GC_UnTrack``. With
``BUCKETMESH_PURE=1`` this file runs, so the pure core keeps its objects tracked: the
collector's work is the only difference, never a decision.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")

#: whether this is the compiled module (heap.c sets it to True)
COMPILED: bool = False


def untrack(obj: T) -> T:
    """``obj``, taken out of the cyclic collector's generations where compiled."""
    return obj
