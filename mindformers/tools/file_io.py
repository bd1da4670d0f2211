"""Files that exist complete or not at all, and one-line error text. Standard library only: command-line tools that
must start fast (rank tables, msrun's worker wrapper) import it without loading MindSpore."""
import json
import os


def first_line(err):
    """The first line of an exception's message (MindSpore's carry long C++ traces), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def fsync_path(path):
    """fsync a file or directory (opened read-only), so what it holds or names survives a power loss; a path that
    cannot be opened is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data):
    """Write `data` (str: UTF-8 with '\\n' line ends; or bytes) to `path` so that it exists complete or not at all:
    a hidden temporary file beside it, fsynced, renamed over `path`, then the directory fsynced. Returns `path`."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.tmp.{os.getpid()}")
    try:
        with open(tmp, 'wb') as f:
            f.write(data.encode('utf-8') if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_path(directory)
    return path


def write_json_atomic(path, data, indent=2, ensure_ascii=True):
    """`write_atomic` of `data` as JSON (one trailing newline). Returns `path`."""
    return write_atomic(path, json.dumps(data, indent=indent, ensure_ascii=ensure_ascii) + '\n')
