"""The build: the package as pyproject.toml declares it, plus the decision core
compiled with mypyc where a compiler is at hand (docs/build.md).

mypyc compiles the modules listed in ``src/bucketmesh/_native.py`` (COMPILED)
together, from the same sources the pure-Python build runs, into extension modules
beside them. Without mypyc (an isolated build, where pyproject.toml's build
requirements do not include mypy), with ``BUCKETMESH_PURE=1``, or when the C
compiler fails, the pure-Python core is installed alone and a message says so.
``make install`` builds it compiled: it installs mypy (a dev dependency) first, then
builds without isolation.

The HTTP server's module (``CYTHONIZED`` in the same file) is compiled by Cython, from
its source and the types in ``http/server.pxd``, when Cython is installed (a dev
dependency too); otherwise it stays pure Python. The modules written in C
(``C_MODULES``: core/heap.c) are built with the rest; each has a pure module of the
same name that runs where it is not.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _say(message: str) -> None:
    print(f"bucketmesh build: {message}", file=sys.stderr, flush=True)


def _native_list(name: str) -> list[str] | None:
    """The list ``name`` of src/bucketmesh/_native.py as paths under the checkout, read
    without importing the package; None where it has none."""
    tree = ast.parse((HERE / "src/bucketmesh/_native.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == name:
            return [f"src/{path}" for path in ast.literal_eval(node.value)]  # type: ignore[arg-type]
    return None


def _compiled_sources() -> list[str]:
    """COMPILED: the modules mypyc compiles together."""
    sources = _native_list("COMPILED")
    if sources is None:
        raise RuntimeError("src/bucketmesh/_native.py has no COMPILED list")
    return sources


def _cython_extensions() -> list[Any]:
    """The HTTP modules compiled by Cython as plain Python (annotations not used as C
    types: the compiled module behaves as its source does, without the interpreter's
    dispatch); none where Cython is missing."""
    # CYTHONIZED: the HTTP hot path's modules, which Cython compiles one by one from
    # the same sources (docs/build.md)
    sources = _native_list("CYTHONIZED")
    if not sources:
        return []
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError:
        _say(
            "Cython is not installed here: the HTTP hot path stays pure Python; "
            "`make install` compiles it"
        )
        return []
    modules = [
        Extension(source[len("src/") : -len(".py")].replace("/", "."), [source])
        for source in sources
    ]
    try:
        return list(
            cythonize(
                modules,
                build_dir="build/cython",
                include_path=["src"],  # http/server.pxd: the types of the build
                quiet=True,
                compiler_directives={
                    "language_level": 3,
                    "annotation_typing": False,  # Python's semantics, not C types
                    "binding": True,
                    "embedsignature": False,
                },
            )
        )
    except (Exception, SystemExit) as error:
        _say(f"Cython could not translate the HTTP modules ({error!r}): they stay pure Python")
        return []


def _c_extensions() -> list[Any]:
    """C_MODULES from src/bucketmesh/_native.py: modules written in C beside a pure
    module of the same name (core/heap.c beside core/heap.py)."""
    from setuptools import Extension

    return [
        Extension(source[len("src/") : -len(".c")].replace("/", "."), [source])
        for source in _native_list("C_MODULES") or []
    ]


def _extensions() -> list[Any]:
    if os.environ.get("BUCKETMESH_PURE", "") not in ("", "0"):
        _say("BUCKETMESH_PURE is set: installing the pure-Python core")
        return []
    return _mypyc_extensions() + _cython_extensions() + _c_extensions()


def _mypyc_extensions() -> list[Any]:
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say(
            "mypyc (part of mypy) is not installed here: installing the pure-Python core; "
            "`make install` (or `pip install mypy` and a build with --no-build-isolation) "
            "compiles it"
        )
        return []
    try:
        return list(mypycify(_compiled_sources(), opt_level="3"))
    except (Exception, SystemExit) as error:  # mypy refused the sources
        _say(f"mypyc could not compile the core ({error!r}): installing the pure-Python core")
        return []


class OptionalBuildExt(build_ext):
    """Compiles the core; when the C compiler is missing or fails, installs the pure one."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:
            # all or nothing: a module compiled without the shared library would not import
            _say(f"compiling the core failed ({error}): installing the pure-Python core")
            for ext in self.extensions:
                built = self.get_ext_fullpath(ext.name)
                if os.path.exists(built):
                    os.remove(built)
            self.extensions = []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
