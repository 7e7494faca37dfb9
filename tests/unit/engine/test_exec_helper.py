"""jobworker-exec built each way exec_helper.build knows (without a C library, static,
plain): each reads the environment from its fd, drops to the user, enters the folder and
runs the command as execvp(3) would, and fails with the same words and exit status."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest

from jobworker.engine import exec_helper

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")

NOBODY = 65534


@pytest.fixture(
    scope="module", params=exec_helper.VARIANTS, ids=lambda v: " ".join(v[:1]) or "plain"
)
def helper(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    variant: list[str] = request.param
    if "-DJW_NOLIBC" in variant and platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip(f"no C-library-free build on {platform.machine()} (x86-64 and arm64 only)")
    return exec_helper.build(tmp_path_factory.mktemp("helper") / "jobworker-exec", [variant])


@pytest.fixture
def world(shared: Path) -> Path:
    """A folder nobody may enter, with a script without "#!", a file it cannot run and a
    folder closed to it."""
    (shared / "script").write_text('echo "script ran: $0 $1"\n')
    (shared / "script").chmod(0o755)
    (shared / "data").write_text("not a program\n")
    (shared / "closed").mkdir(mode=0o700)
    return shared


def run(
    helper: Path, env: list[str], args: list[str], groups: str = "-", cwd: str = "/"
) -> tuple[int, str, str]:
    """The helper run as the supervisor runs it (ENVFD a memfd), dropping to nobody."""
    fd = os.memfd_create("env")
    try:
        os.pwrite(fd, b"".join(e.encode() + b"\0" for e in env), 0)
        ids = [str(NOBODY), str(NOBODY), groups]
        done = subprocess.run(
            [str(helper), str(fd), *ids, cwd, *args],
            check=False,
            pass_fds=(fd,),
            capture_output=True,
            text=True,
            env={},
            timeout=30,
        )
    finally:
        os.close(fd)
    return done.returncode, done.stdout, done.stderr


def test_it_drops_to_the_user_with_the_jobs_environment_only(helper: Path, world: Path) -> None:
    env = ["PATH=/nope:/usr/bin:/bin", "A=one two"]
    script = 'id -u; id -g; id -G; pwd; echo "$A"; env | grep -v ^PWD= | sort'
    assert run(helper, env, ["sh", "-c", script], cwd=str(world)) == (
        0,
        f"65534\n65534\n65534\n{world}\none two\nA=one two\nPATH=/nope:/usr/bin:/bin\n",
        "",
    )
    assert run(helper, ["PATH=/bin"], ["id", "-G"], groups="65534,100,4294967294") == (
        0,
        "65534 100 4294967294\n",
        "",
    )


def test_an_environment_larger_than_its_first_buffer_arrives_whole(helper: Path) -> None:
    env = [f"V{i}={'x' * 1000}" for i in range(300)] + ["PATH=/bin"]
    assert run(helper, env, ["sh", "-c", 'env | wc -l; echo "${#V299}"']) == (0, "302\n1000\n", "")


def test_it_searches_as_execvp_does(helper: Path, world: Path) -> None:
    # A script without "#!" runs through /bin/sh, found in PATH or named by its path.
    script = str(world / "script")
    assert run(helper, [f"PATH={world}"], ["script", "x"]) == (0, f"script ran: {script} x\n", "")
    assert run(helper, [], [script, "y"]) == (0, f"script ran: {script} y\n", "")
    assert run(helper, [], ["true"])[0] == 0  # no PATH: /bin:/usr/bin


@pytest.mark.parametrize(
    ("env", "args", "cwd", "expected"),
    [
        (["PATH=/nope"], ["true"], "/", (127, "cannot execute true: No such file or directory")),
        ([], ["{world}/data"], "/", (126, "cannot execute {world}/data: Permission denied")),
        ([], [""], "/", (127, "cannot execute : No such file or directory")),
        (
            [],
            ["true"],
            "{world}/closed",
            (125, "cannot enter the working directory {world}/closed: Permission denied"),
        ),
    ],
    ids=["not-found", "not-runnable", "empty", "closed-folder"],
)
def test_failures_say_what_failed_and_exit_as_env_does(
    helper: Path,
    world: Path,
    env: list[str],
    args: list[str],
    cwd: str,
    expected: tuple[int, str],
) -> None:
    args = [a.format(world=world) for a in args]
    code, message = expected
    assert run(helper, env, args, cwd=cwd.format(world=world)) == (
        code,
        "",
        f"jobworker-exec: {message.format(world=world)}\n",
    )


@pytest.mark.parametrize(
    ("ids", "field"),
    [
        (["-1", "1", "-"], "UID"),
        (["4294967295", "1", "-"], "UID"),
        (["", "1", "-"], "UID"),
        (["1", "x", "-"], "GID"),
        (["1", "1", "1,,2"], "GROUPS"),
        (["1", "1", "12345678901234567"], "GROUPS"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(
    helper: Path, ids: list[str], field: str
) -> None:
    fd = os.memfd_create("env")
    try:
        argv = [str(helper), str(fd), *ids, "/", "true"]
        done = subprocess.run(argv, check=False, pass_fds=(fd,), capture_output=True, text=True)
    finally:
        os.close(fd)
    assert (done.returncode, done.stderr) == (
        125,
        f"jobworker-exec: bad argument: {field}: Invalid argument\n",
    )
    done = subprocess.run([str(helper)], check=False, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (
        125,
        "jobworker-exec: usage: jobworker-exec ENVFD UID GID GROUPS CWD ARGV0 [ARG...]\n",
    )
