"""Snapshot and restore MindFormerRegister's tables, so a test that registers a class (a callback, a metric, a
pipeline) leaves nothing behind for the tests after it. Fixture: `clean_registry` in conftest.py."""
import contextlib

from mindformers.tools.register import MindFormerRegister
from mindformers.tools.register import register as register_module


def _tables():
    """MindFormerRegister's class-level dicts (today `registry`: module type -> name -> class)."""
    return {name: value for name, value in vars(MindFormerRegister).items() if isinstance(value, dict)}


def snapshot():
    """The tables as they are now, two levels deep. MindSpore's own classes, registered lazily on the first lookup,
    are registered first so that restoring never drops them."""
    ensure_builtins = getattr(register_module, '_ensure_builtins_registered', None)
    if ensure_builtins is not None:
        ensure_builtins()
    return {name: (table, {key: (inner, dict(inner) if isinstance(inner, dict) else None)
                           for key, inner in table.items()})
            for name, table in _tables().items()}


def restore(saved):
    """Put the tables back as `snapshot` saw them, in place (code holding a table keeps the same object)."""
    for table, entries in saved.values():
        table.clear()
        for key, (inner, contents) in entries.items():
            if contents is not None:
                inner.clear()
                inner.update(contents)
            table[key] = inner


@contextlib.contextmanager
def registry_restored():
    """Inside the block, register freely; on leaving it every table is as it was."""
    saved = snapshot()
    try:
        yield MindFormerRegister
    finally:
        restore(saved)
