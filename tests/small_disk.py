"""A real, tiny filesystem for disk-fault tests: a tmpfs of a few pages.

tmpfs hands out space a page at a time: a write into a page a file already has
succeeds on a full filesystem, a write that needs a new page fails with ENOSPC,
and one that starts inside the last page and goes on past it writes what fits
there, then fails. ``fill`` takes every free page (or all but a few) with a
file of its own and ``free`` gives them back, so a test decides exactly when
the disk is full and how much room the file under test has left.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

SIZE = 256 * 1024  # 64 pages


class MountRefused(RuntimeError):
    """This process may not mount a filesystem here."""


class SmallDisk:
    def __init__(self, path: Path, size: int = SIZE) -> None:
        self.path = path
        self.size = size
        self.filler = path / ".filler"
        self.mounted = False

    @property
    def page(self) -> int:
        """The filesystem's unit of allocation (tmpfs: the page size)."""
        return os.statvfs(self.path).f_bsize

    def mount(self) -> None:
        if shutil.which("mount") is None:
            raise MountRefused("no mount(8) on this machine")
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            said = done.stderr.strip().splitlines()
            raise MountRefused(said[0] if said else f"mount exited with {done.returncode}")
        self.mounted = True

    def unmount(self) -> None:
        """Unmount; a file still open on the disk is a leak the test should know of."""
        if not self.mounted:
            return
        done = subprocess.run(
            ["umount", str(self.path)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            subprocess.run(["umount", "--lazy", str(self.path)], check=False)
            self.mounted = False
            raise AssertionError(f"{self.path} still in use at the end of the test: {done.stderr}")
        self.mounted = False

    def free_bytes(self) -> int:
        info = os.statvfs(self.path)
        return info.f_bavail * info.f_bsize

    def fill(self, leave_pages: int = 0) -> None:
        """Take every free page but ``leave_pages``: from then on, only writes into pages
        files already have (and ``leave_pages`` more) succeed."""
        page = self.page
        block = bytes(page)
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                try:
                    os.write(fd, block)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
            size = os.fstat(fd).st_size
            os.ftruncate(fd, max(0, size - size % page - leave_pages * page))
        finally:
            os.close(fd)
        assert self.free_bytes() == leave_pages * page, (self.free_bytes(), leave_pages)

    def free(self) -> None:
        """Give back every page ``fill`` took."""
        self.filler.unlink(missing_ok=True)
