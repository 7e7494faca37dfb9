"""A preload library for tests: it records who loads it (issue 11, LD_PRELOAD escalation).

Built with gcc in the test. Every process that loads it appends one line to its log:
"uid=U euid=E exe=PATH cwd=PATH". Both live in a folder every user can read, so that a
job as nobody can load the library and write its line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_SOURCE = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

__attribute__((constructor)) static void jobworker_test_record(void) {
    char exe[4096] = "?", cwd[4096] = "?", line[8400];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n >= 0) exe[n] = 0;
    if (!getcwd(cwd, sizeof cwd)) strcpy(cwd, "?");
    int len = snprintf(line, sizeof line, "uid=%d euid=%d exe=%s cwd=%s\n",
                       (int)getuid(), (int)geteuid(), exe, cwd);
    int fd = open(LOG, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd >= 0) {
        if (write(fd, line, len) < 0) {}
        close(fd);
    }
}
"""


@dataclass(frozen=True)
class Loaded:
    """One process the library was loaded into."""

    uid: int
    euid: int
    exe: str
    cwd: str


@dataclass(frozen=True)
class Preload:
    folder: Path  # readable by everyone; remove() it at the end
    library: Path
    log: Path

    def loads(self) -> list[Loaded]:
        out = []
        for line in self.log.read_text().splitlines():
            fields = dict(part.split("=", 1) for part in line.split(" "))
            out.append(
                Loaded(int(fields["uid"]), int(fields["euid"]), fields["exe"], fields["cwd"])
            )
        return out

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def build_preload() -> Preload:
    """Compile the library into a new folder under /tmp (pytest's tmp is root's only)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is needed to build the preload library")
    folder = Path(tempfile.mkdtemp(prefix="jobworker-preload-"))
    os.chmod(folder, 0o755)
    log = folder / "loads.log"
    log.touch()
    os.chmod(log, 0o666)  # root and the job's user both append
    source = folder / "record.c"
    source.write_text(_SOURCE)
    library = folder / "record.so"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O1", f'-DLOG="{log}"', "-o", str(library), str(source)],
        check=True,
        capture_output=True,
    )
    os.chmod(library, 0o755)
    return Preload(folder, library, log)
