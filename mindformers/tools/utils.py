"""Small shared helpers: path resolution against the installed package, the cache directory, and the argument
parser of the command-line tools."""
import argparse
import os
import shutil
import sys

from mindformers.tools.file_io import first_line

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(PACKAGE_DIR)


def resolve_path(path):
    """Return `path` if it exists as given; else try it relative to the package (`mindformers/`), then to the
    directory above it (a source checkout or the installed `configs/`). Unresolvable paths come back unchanged."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    for root in (PACKAGE_DIR, REPO_DIR, os.path.join(PACKAGE_DIR, '_packaged')):
        candidate = os.path.join(root, path)
        if os.path.exists(candidate):
            return candidate
    return path


def cache_dir(*parts):
    """`$MINDFORMERS_CACHE/<parts>` (default `~/.cache/mindformers/<parts>`), created if missing."""
    root = os.environ.get('MINDFORMERS_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'mindformers')
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse for the command-line tools: a usage error is one line on stderr, `<name>: error: <message>` (`name`
    defaults to `prog`; argparse's own prints the whole usage first), and exit status 2."""

    def __init__(self, *args, name=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.name = name or self.prog

    def error(self, message):
        sys.exit(cli_error(self.name, message, 2))


def cli_error(prog, message, code):
    """Write the one error line of a command-line tool, `<prog>: error: <message>`, to stderr; returns `code` (the
    exit status: 2 the command line is wrong, 1 a file's content or the run failed)."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    return code


def run_cli(prog, parser, argv, body):
    """Run a command-line tool: parse `argv` with `parser` and call `body(args)`; returns the exit status: 0 when
    `body` returned, 2 for a UsageError, 1 for a ValueError or OSError (a file's content, the disk) or anything else
    (named by its type), each written as the one error line of `cli_error`."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # a bad flag (its line is written) or --help
        return stop.code
    try:
        body(args)
    except UsageError as err:
        return cli_error(prog, first_line(err), 2)
    except (ValueError, OSError) as err:
        return cli_error(prog, first_line(err), 1)
    except Exception as err:  # pylint: disable=broad-except
        return cli_error(prog, f"{type(err).__name__}: {first_line(err)}", 1)
    return 0


class UsageError(ValueError):
    """The command line is wrong (a CLI exits 2 on it): a path named on it that does not exist or cannot be used, an
    existing output without --overwrite, ..."""


def check_output_path(path, flag, overwrite, directory=False):
    """Refuse (UsageError naming `flag`) an output path that cannot be used: one under a file, or an existing one
    without `overwrite` (an empty directory is no output yet when `directory` outputs are written), or of the other
    kind (a directory where a file is written, or the reverse)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) != directory:
        raise UsageError(f"{flag} {path} is {'a file' if directory else 'a directory'}; give "
                         f"{'a directory' if directory else 'a file'} path")
    if not overwrite and not (directory and not os.listdir(path)):
        raise UsageError(f"{flag} {path} already exists; pass --overwrite to replace it")


def staging_path(path):
    """A hidden, unused name beside `path` (same extension) to write a replacement of `path` before `replace_output`."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{os.getpid()}.replacing.{name}")


def replace_output(new, old):
    """Put the finished output `new` (a file or directory beside `old`) in place of `old`: a file in one atomic
    rename; a directory `old` is renamed aside first and removed once `new` is in place, so nothing of the old output
    is left beside the new one (a crash in between leaves it under a hidden `.<pid>.replacing...` name)."""
    if os.path.isdir(old) and not os.path.islink(old):
        aside = staging_path(old) + '.old'
        os.rename(old, aside)
        try:
            os.rename(new, old)
        except BaseException:
            os.rename(aside, old)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(new, old)


def check_unicode(text, what):
    """`text` if it encodes as UTF-8; else a ValueError naming `what` and the lone surrogate (what bytes that are not
    UTF-8 become when decoded with errors='surrogateescape', as Python does for command-line arguments)."""
    try:
        text.encode('utf-8')
    except UnicodeEncodeError as err:
        shown = text if len(text) <= 40 else text[:40] + '...'
        raise ValueError(f"{what} {shown!r} is not valid text: character {err.start} is the lone surrogate "
                         f"{text[err.start]!r} (bytes that are not UTF-8, e.g. in a command-line argument or a file "
                         f"read with errors='surrogateescape'); pass UTF-8 text") from None
    return text
