"""Small shared helpers: path resolution against the installed package, the cache directory, and the argument
parser of the command-line tools."""
import argparse
import os
import sys

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
        sys.stderr.write(f"{self.name}: error: {message}\n")
        sys.exit(2)
