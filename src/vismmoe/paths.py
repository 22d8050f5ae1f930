"""Files and folders a user names: checked before any work starts, written so that a failure leaves nothing half.

Owns what counts as a usable input file (it exists and is a regular file: a FIFO, a device or a folder where a
file should be is refused, never opened, so nothing waits on it), reading a JSON file a user or a checkpoint
supplies, and the rules for outputs:

- an output file (`output_file`): its folder exists and takes a file, the path is not a folder or a special file,
  its extension is one the writer produces (`--trace t.npz`, `--timeline t.png`); written under a temporary name in
  the same folder and renamed over the target when complete (`atomic_file`);
- an output folder of reports (`output_dir`): not a file, its nearest existing parent is a writable folder, and if
  it holds anything it holds a previous run of the same command (its marker file), else `--force` is needed;
- an output folder that is one piece (a checkpoint: `new_dir` / `atomic_dir`): an existing non-empty folder is
  refused unless `--force`; the new folder is written under a temporary name beside it and renamed into place at
  the end, so existing data survives a refusal, a failure or an interruption, and a `--force` replaces it only
  when the new one is complete.

An output never destroys an input (`not_an_input`, which every output check above takes as `inputs`): an output
that IS an input (a file, or the folder it is in), one that would replace an existing file inside an input folder
(`--trace MODEL/calibration.npz`), and an output folder replaced whole that holds an input (`quantize --out` equal
to or above `--model`) are refused, whatever `--force` says.

Every refusal is a `UserError` naming the option and the path. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile

from .errors import UserError


# ---- inputs ----------------------------------------------------------------------------------------------------
def input_file(path: str, what: str, fix: str) -> str:
    """`path` if it is a regular file (symlinks followed); else a UserError "`what` not found / is a directory / is
    not a regular file: path" with `fix`. Special files (FIFOs, devices, sockets) are refused before any open: a
    FIFO would block the reader for ever."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}", fix) from None
    except (OSError, ValueError) as e:            # a path too long, a loop of links, a NUL byte
        raise UserError(f"{what} cannot be read: {path} ({type(e).__name__})", fix) from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} is a directory: {path}", fix)
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} is not a regular file (a FIFO, device or socket): {path}", fix)
    return path


def read_json(path: str, what: str, fix: str):
    """The JSON value in regular file `path`; a UserError "`what` ..." (name the file in `what`) for a missing,
    special, unreadable, non-UTF-8 or malformed file."""
    input_file(path, what, fix)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not valid JSON: byte {e.start} is not UTF-8 text", fix) from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} is not valid JSON ({e.msg} at line {e.lineno})", fix) from None
    except (OSError, RecursionError) as e:
        raise UserError(f"{what} cannot be read ({type(e).__name__})", fix) from None


# ---- outputs ---------------------------------------------------------------------------------------------------
def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def not_an_input(path: str, flag: str, inputs: dict | None, whole_folder: bool = False) -> None:
    """Refuse output `path` of option `flag` where writing it would destroy an input: `inputs` maps each input's
    option to its path (a file or a folder; None: not given). Refused: the output is an input, or an input folder
    itself; it is an existing file inside an input folder (it would be replaced); `whole_folder` (an output folder
    replaced whole, `new_dir`): an input lies inside it. `--force` does not lift this."""
    out = _real(path)
    for in_flag, in_path in (inputs or {}).items():
        if not in_path:
            continue
        src = _real(in_path)
        what = f"{flag} {path} would overwrite the input of {in_flag} ({in_path})"
        if out == src or (whole_folder and _within(src, out)):
            raise UserError(what, f"give {flag} a path apart from the inputs")
        if os.path.isdir(src) and _within(out, src) and os.path.lexists(out):
            raise UserError(f"{flag} {path} would replace a file of the {in_flag} folder {in_path}",
                            f"give {flag} a path outside {in_path}, or a new file name")


def _probe_writable(folder: str, flag: str, path: str) -> None:
    """Create and remove a file in `folder` (os.access says yes to root on a read-only file system)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".vismmoe-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {folder} ({e.strerror or type(e).__name__})",
                        "give a path in a folder you can write to") from None


def _special(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def output_file(path: str, flag: str, exts: tuple[str, ...], inputs: dict | None = None) -> str:
    """Check output file `path` of option `flag` before the work: a known extension (`exts`, e.g. (".npz",)), its
    folder exists and is writable, the path is not a folder or a special file, and not an input (`not_an_input`).
    An existing regular file is replaced when the new one is complete (`atomic_file`). Returns `path`."""
    if not path or path.endswith(os.sep):
        raise UserError(f"{flag} {path!r} names no file", f"give a file name ending in {' or '.join(exts)}")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is an existing folder",
                        f"give a file name ending in {' or '.join(exts)}, e.g. {os.path.join(path, 'out' + exts[0])}")
    if not path.lower().endswith(tuple(e.lower() for e in exts)):
        raise UserError(f"{flag} {path} does not end in {' or '.join(exts)}",
                        f"{flag} writes {' or '.join(exts)} files: name it so")
    if _special(path):
        raise UserError(f"{flag} {path} is not a regular file (a FIFO, device or socket)", "give a new file name")
    not_an_input(path, flag, inputs)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: folder {os.path.dirname(path) or '.'} does not exist",
                        "create it first or give a path in an existing folder")
    _probe_writable(folder, flag, path)
    return path


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_created(path: str, mode: int) -> None:
    """Give a temporary file or folder (made 0600 / 0700 by tempfile) the mode a plain create would: `mode` less
    the umask."""
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str):
    """Yields a temporary path beside `path` with the same extension (writers that add or read the extension
    keep working); renamed over `path` when the block ends without error (with the mode a plain create gives),
    removed otherwise."""
    folder, base = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(base)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".partial{ext}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        _as_created(tmp, 0o666)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _entries(path: str, flag: str) -> list[str]:
    """The names in folder `path` ([] when it does not exist); a UserError when it cannot be listed."""
    if not os.path.isdir(path):
        return []
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot list the folder ({e.strerror or type(e).__name__})",
                        "give a folder you can read and write") from None


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return p


def output_dir(path: str, flag: str, force: bool = False, owned: tuple[str, ...] = (),
               inputs: dict | None = None) -> str:
    """Check report folder `path` of option `flag` before the work: not a file, creatable under a writable folder,
    not an input (`not_an_input`), and empty or holding a previous run of the same command (any of the `owned` file
    names; a name ending in `*` is a prefix; `force` accepts any folder). Files of that command in it are replaced;
    nothing else in it is touched. Returns `path`."""
    if not path:
        raise UserError(f"{flag} names no folder", "give a folder path")
    not_an_input(path, flag, inputs)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is an existing file, not a folder", "give a new or empty folder")
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise UserError(f"{flag} {path}: {base} is a file, so the folder cannot be made", "give another folder")
    held = _entries(path, flag)
    if held and not force and not any(e == f or (f.endswith("*") and e.startswith(f[:-1]))
                                      for f in owned for e in held):
        raise UserError(f"{flag} {path} is a folder with other files in it",
                        "give a new or empty folder, or add --force to write into it anyway")
    _probe_writable(base, flag, path)
    return path


def new_dir(path: str, flag: str, force: bool = False, inputs: dict | None = None) -> str:
    """Check output folder `path` of a command that writes a whole folder (a checkpoint): not a file, creatable,
    not an input nor a folder holding one (`not_an_input`, even with `force`), and not an existing non-empty folder
    unless `force` (which replaces it, once the new one is complete)."""
    if not path:
        raise UserError(f"{flag} names no folder", "give a folder path")
    not_an_input(path, flag, inputs, whole_folder=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is an existing file, not a folder", "give a new or empty folder")
    held = _entries(path, flag)
    if held and not force:
        raise UserError(f"{flag} {path} already holds files (e.g. {held[0]})",
                        "give a new or empty folder, or add --force to replace it once the new one is written")
    base = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(base):
        raise UserError(f"{flag} {path}: {base} is a file, so the folder cannot be made", "give another folder")
    _probe_writable(base, flag, path)
    return path


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yields a temporary folder beside `path`; when the block ends without error it becomes `path` (an existing
    `path` is moved aside first and deleted after the rename), otherwise it is deleted and `path` is untouched.
    Check `path` with `new_dir` first."""
    target = os.path.abspath(path)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        yield tmp
        _as_created(tmp, 0o777)
        old = None
        if os.path.isdir(target):
            if os.listdir(target):
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.replace(target, os.path.join(old, name))
            else:
                os.rmdir(target)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
