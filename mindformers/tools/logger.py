"""The `mindformers` logger: INFO to stderr (stdout carries only results, e.g. predicted text), and per-rank files
once `setup_file_logging` names an output dir."""
import logging
import os
import sys

_DATE = '%Y-%m-%d %H:%M:%S'


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (so redirections and test captures see the log)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


logger = logging.getLogger('mindformers')
if not logger.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter('%(asctime)s - mindformers - %(levelname)s - %(message)s', _DATE))
    logger.addHandler(_handler)
    logger.setLevel(os.environ.get('MINDFORMERS_LOG_LEVEL', 'INFO').upper())
    logger.propagate = False

_file_handlers = {}


def setup_file_logging(output_dir, rank_id=0, device_num=1):
    """Also write the log to `<output_dir>/log/rank_<rank_id>/mindformer.log`; returns that directory. In a job of
    several processes (`device_num` > 1) the console lines name their rank, as the workers' output interleaves."""
    if device_num > 1:
        for handler in logger.handlers:
            if isinstance(handler, _StderrHandler):
                handler.setFormatter(logging.Formatter(
                    f'%(asctime)s - mindformers[rank {rank_id}] - %(levelname)s - %(message)s', _DATE))
    log_dir = os.path.join(output_dir, 'log', f'rank_{rank_id}')
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(log_dir, 'mindformer.log'))
    if path not in _file_handlers:
        for old in _file_handlers.values():
            logger.removeHandler(old)
        _file_handlers.clear()
        handler = logging.FileHandler(path, encoding='utf-8')
        handler.setFormatter(logging.Formatter('%(asctime)s - %(levelname)s - %(message)s', _DATE))
        logger.addHandler(handler)
        _file_handlers[path] = handler
    return log_dir
