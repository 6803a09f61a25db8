"""The one rule every command follows for what it writes, and how it reads files beside a checkpoint.

An output (a converted or fine-tuned checkpoint, a fine-tuning run directory) is built in a new
temporary directory beside it, `.NAME.partial-HOST-PID-XXXX`, and renamed into place at the end,
so a failure or a kill never leaves half of it. Before any work starts, `check_output` refuses an
output that overlaps an input (is one, holds one, or lies inside one) and an existing output
unless `--force` was given and the tool wrote it itself: every output carries a `MARKER` file, so
`--force` never replaces a user's own directory or file. A partial directory whose process is dead
(a killed job) is removed by the next command writing the same output.

Side files of a source checkpoint (tokenizer, chat templates, generation config) are read only if
they are regular files inside its directory: a link leading elsewhere could copy a private file
into an output the user shares, and a FIFO or device could block forever.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

MARKER = ".ladder-output"  # present in every directory this tool writes as an output
# Set by the launcher in each rank it spawns: its pid, so a rank whose launcher died commits nothing.
LAUNCHER_PID_ENV = "LADDER_LAUNCHER_PID"


class OutputError(ValueError):
    """An output that may not be written; raised before anything is written."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and replacing it was not asked for."""


class UnsafeFileError(ValueError):
    """A side file of a source that is not a regular file inside the source's directory."""


def _overlap(output: Path, source: Path) -> str | None:
    out, src = output.resolve(), source.resolve()
    if out == src:
        return "is"
    if out in src.parents:
        return "contains"
    if src in out.parents:
        return "lies inside"
    return None


def refuse_overlaps(output: Path, inputs: Iterable[Path], flag: str = "") -> None:
    """Refuse an `output` that is, holds or lies inside one of `inputs` (everything the command reads,
    and its other outputs)."""
    for source in inputs:
        relation = _overlap(output, Path(source))
        if relation:
            raise OutputError(f"{_named(output, flag)} {relation} {source}, which this command reads or writes "
                              "too; choose an output apart from every input")


def _named(output: Path, flag: str) -> str:
    return f"{flag} {output}" if flag else str(output)


def check_output(output: Path, inputs: Iterable[Path], force: bool, flag: str = "") -> None:
    """Refuse, before any work, an `output` that overlaps one of `inputs` or may not be replaced."""
    refuse_overlaps(output, inputs, flag)
    name = _named(output, flag)
    if not (output.exists() or output.is_symlink()):
        return
    if not force:
        raise OutputExistsError(f"{name} already exists (use --force to replace it)")
    if not written_by_us(output):
        raise OutputError(f"{name} already exists and was not written by ladder (it has no {MARKER}); "
                          "--force replaces only ladder's own outputs: move it away or choose another path")


def written_by_us(path: Path) -> bool:
    """Whether `path` is a directory this tool wrote as an output (not a link to one)."""
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


# --- building an output beside its final place ----------------------------------------------------


def _partial_prefix(output: Path) -> str:
    return f".{output.name}.partial-"


def start_output(output: Path) -> Path:
    """A new, marked temporary directory beside `output`, after removing those of dead jobs."""
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output)
    return _new_partial(output)


def _new_partial(output: Path) -> Path:
    tag = f"{_partial_prefix(output)}{socket.gethostname()}-{os.getpid()}-"
    partial = Path(tempfile.mkdtemp(prefix=tag, dir=output.parent))
    (partial / MARKER).write_text("written by ladder; `--force` may replace this directory\n")
    return partial


def commit_output(staging: Path, output: Path, force: bool) -> None:
    """Rename `staging` to `output`, replacing an earlier output of this tool only if `force`.

    Checked again here, at the end, because the output may have appeared while the job ran.
    """
    check_job_alive()
    check_output(output, (), force)
    if not output.exists():
        staging.rename(output)
        return
    old = _new_partial(output)  # if this process dies now, the next run removes the replaced output
    output.rename(old / output.name)
    staging.rename(output)
    shutil.rmtree(old)


def write_report(path: Path, text: str) -> None:
    """Write a small report file (e.g. `--json-out`) whole or not at all: into a temporary file beside
    it, renamed over it at the end by a live job, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=_partial_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        check_job_alive()
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise


def check_job_alive() -> None:
    """Refuse to commit from a rank whose launcher has died: an output is committed only by a live job."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and os.getppid() != int(launcher):
        raise OutputError("the launcher of this job has died; nothing is committed")


def remove_stale_partials(output: Path) -> None:
    """Remove the temporary directories of `output` left by jobs on this host that are no longer alive."""
    host = socket.gethostname()
    for partial in output.parent.glob(_partial_prefix(output) + "*"):
        owner, _, rest = partial.name[len(_partial_prefix(output)):].rpartition("-")
        owner_host, _, pid = owner.rpartition("-")
        if rest and owner_host == host and pid.isdigit() and not _alive(int(pid)) and written_by_us(partial):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


# --- reading side files of a source ----------------------------------------------------------------


def side_file(directory: Path, name: str) -> Path | None:
    """`directory/name` if it is a regular file inside `directory`; None if absent; refused otherwise."""
    path = directory / name
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        target = path.resolve()
        if directory.resolve() not in target.parents:
            raise UnsafeFileError(f"{path} is a link to {target}, outside {directory}; refusing to read it "
                              "(copy the file itself into the checkpoint if you mean it)")
        mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise UnsafeFileError(f"{path} is not a regular file (a FIFO, device, socket or directory); refusing to read it")
    return path


def read_side_files(directory: Path, names: Iterable[str]) -> dict[str, bytes]:
    """The contents of those of `names` present in `directory`, each checked by `side_file`."""
    found = {name: side_file(directory, name) for name in names}
    return {name: path.read_bytes() for name, path in found.items() if path is not None}
