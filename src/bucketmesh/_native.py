"""Which build of the decision core runs: mypyc-compiled, or the pure-Python reference.

``make install`` (``setup.py``) compiles the modules in ``COMPILED`` with mypyc, from
these same source files, into extension modules beside them; where no compiler is
found it installs the pure-Python core alone (docs/build.md). Python imports an
extension module before a ``.py`` of the same name, so the compiled build runs
whenever it is there, except:

* ``BUCKETMESH_PURE=1`` in the environment: every ``bucketmesh`` module is loaded
  from its ``.py`` source (the reference; what the equivalence test compares the
  compiled build with, and what CI runs the core and simulator tests on);
* in a checkout, a compiled module older than its source (the source was edited
  after the last build): the pure core is loaded instead, with a warning to rebuild,
  so a stale build never decides.

``bucketmesh/__init__.py`` calls ``select()`` before it imports anything else.
This module imports nothing of bucketmesh and does nothing when imported.
"""

from __future__ import annotations

import os
import sys
import warnings
from importlib.machinery import EXTENSION_SUFFIXES, SOURCE_SUFFIXES, FileFinder, SourceFileLoader
from typing import Final

#: the modules mypyc compiles together (one shared library: calls between them are
#: native), as paths under src/; setup.py reads this list
#: (what a decision runs). Not compiled: core/structs.py (mypyc would drop the msgspec
#: class options), rules.py and shares.py (msgspec structs of their own; off the
#: decision path), limits.py, decisions.py and affinity.py (nothing per decision).
COMPILED: Final = (
    "bucketmesh/core/bucket.py",
    "bucketmesh/core/limiter.py",
)

#: the HTTP hot path's modules (the server, and the POST /v1/rate callback the server
#: calls instead of the router), compiled one by one by Cython from these same sources
#: as plain Python (no C types: the compiled module does what its source says, without
#: the interpreter's dispatch per bytecode); setup.py reads this list too. The source
#: stays the reference: BUCKETMESH_PURE=1 runs it, and tests/test_http_compiled.py
#: requires both to answer the same bytes (docs/build.md).
CYTHONIZED: Final = ("bucketmesh/http/server.py", "bucketmesh/api/hot.py")

#: modules written in C beside a pure-Python module of the same name and behaviour
#: (the reference, and what runs where they are not built); setup.py reads this list
#: too. core/heap.c keeps buckets out of the cyclic garbage collector (core/heap.py).
C_MODULES: Final = ("bucketmesh/core/heap.c",)

PURE_ENV: Final = "BUCKETMESH_PURE"
_ROOT: Final = os.path.dirname(os.path.abspath(__file__))
_SRC: Final = os.path.dirname(_ROOT)


def _extension_of(source: str) -> str | None:
    """The compiled module beside ``source`` (a .py path), or None."""
    stem = source[: -len(".py")]
    for suffix in EXTENSION_SUFFIXES:
        if os.path.exists(stem + suffix):
            return stem + suffix
    return None


def stale() -> list[str]:
    """The compiled modules older than their sources (edited since the last build), in a
    checkout. An installed wheel is never stale: pip writes its files in the wheel's
    order, so a source may be written after its compiled module."""
    if not os.path.exists(os.path.join(os.path.dirname(_SRC), "setup.py")):
        return []
    out = []
    for relative in COMPILED + CYTHONIZED + C_MODULES:
        source = os.path.join(_SRC, relative)
        extension = _extension_of(os.path.splitext(source)[0] + ".py")
        if extension is not None and os.path.getmtime(source) > os.path.getmtime(extension):
            out.append(relative)
    return out


def force_pure() -> None:
    """Load every ``bucketmesh`` module not imported yet from its ``.py`` source."""

    def source_only(path: str) -> FileFinder:
        if not os.path.abspath(path).startswith(_ROOT):
            raise ImportError  # not ours: the next hook handles it
        return FileFinder(path, (SourceFileLoader, SOURCE_SUFFIXES))

    sys.path_hooks.insert(0, source_only)
    for path in list(sys.path_importer_cache):
        if os.path.abspath(path).startswith(_ROOT):
            del sys.path_importer_cache[path]


def select() -> None:
    """Called once by ``bucketmesh/__init__.py``; see the module docstring."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        force_pure()
        return
    old = stale()
    if old:
        warnings.warn(
            f"bucketmesh: the compiled core is older than {', '.join(old)}; running the "
            "pure-Python core (run `make install` to rebuild it)",
            RuntimeWarning,
            stacklevel=3,
        )
        force_pure()


def compiled_http() -> bool:
    """Whether the HTTP server running in this process is the Cython build."""
    from bucketmesh.http import server

    return not (server.__file__ or "").endswith(".py")


def compiled() -> bool:
    """Whether the decision core running in this process is the mypyc build."""
    from bucketmesh.core import bucket

    return not (bucket.__file__ or "").endswith(".py")
