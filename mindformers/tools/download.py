"""Downloads into the cache: resumable, verified, never replacing a good file with a bad one.

Files land in `$MINDFORMERS_CACHE/<cache_subdir>/<filename>` (default cache `~/.cache/mindformers`). A transfer goes
to `<file>.part` first; an interrupted one resumes from there with an HTTP Range request. The finished file is
checked against its sha256 and only then renamed into place. Processes fetching the same file take turns through
an exclusive lock on `<file>.lock`. With `MINDFORMERS_OFFLINE=1` nothing touches the network."""
import fcntl
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request

from mindformers.tools.checkpoint import file_sha256
from mindformers.tools.logger import logger
from mindformers.tools.utils import cache_dir

CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """A file could not be fetched or verified; the message says which and what to do."""


def offline_mode():
    return os.environ.get('MINDFORMERS_OFFLINE', '0') not in ('', '0', 'false', 'False')


def download_file(url, sha256=None, filename=None, cache_subdir='downloads', offline=None, progress=True,
                  timeout=30):
    """Path of the cached, verified copy of `url`, downloading (or resuming) it when needed.

    `sha256`: expected hex digest (checked on every download and on cached files). `offline`: default
    `MINDFORMERS_OFFLINE`. Raises DownloadError (HTTP or network failure, checksum mismatch, offline and not cached)."""
    name = filename or os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise DownloadError(f"cannot tell a file name from URL {url!r}; pass filename=")
    target = os.path.join(cache_dir(cache_subdir), name)
    offline = offline_mode() if offline is None else offline
    with open(target + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(target) and (sha256 is None or file_sha256(target) == sha256):
            return target
        if offline:
            state = 'does not match its checksum' if os.path.isfile(target) else 'is not in the cache'
            raise DownloadError(f"{target} {state} and offline mode (MINDFORMERS_OFFLINE=1) forbids downloading "
                                f"{url}; put the file there or unset MINDFORMERS_OFFLINE")
        part = target + '.part'
        _fetch(url, part, timeout, progress)
        actual = file_sha256(part)
        if sha256 is not None and actual != sha256:
            os.remove(part)  # a bad transfer must not be resumed
            raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}; the "
                                f"download was discarded" + (f" and the cached {target} left as it was"
                                                               if os.path.isfile(target) else ""))
        os.replace(part, target)
        return target


def _fetch(url, part, timeout, progress):
    """Download `url` into `part`, continuing an existing partial file when the server supports ranges."""
    start = os.path.getsize(part) if os.path.isfile(part) else 0
    request = urllib.request.Request(url, headers={'Range': f'bytes={start}-'} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # nothing left to send: the partial file is complete (verified next)
            return
        raise DownloadError(f"downloading {url} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, 'reason', err)
        raise DownloadError(f"downloading {url} failed: {reason}") from None
    with response:
        resumed = start and response.status == 206
        if start and not resumed:
            logger.info("%s ignored the resume request; downloading from the start", url)
            start = 0
        length = response.headers.get('Content-Length')
        total = start + int(length) if length is not None else None
        done, shown, began = start, time.monotonic(), time.monotonic()
        with open(part, 'ab' if resumed else 'wb') as f:
            try:
                while True:
                    block = response.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    done += len(block)
                    if progress and time.monotonic() - shown >= 2:
                        shown = time.monotonic()
                        _report(url, done, start, total, shown - began)
            except (http.client.IncompleteRead, OSError) as err:
                if isinstance(err, http.client.IncompleteRead):
                    f.write(err.partial)
                    done += len(err.partial)
            f.flush()
            os.fsync(f.fileno())
    if total is not None and done < total:
        raise DownloadError(f"downloading {url} stopped after {done} of {total} bytes; run again to resume "
                            f"(the partial file {part} is kept)")
    if progress:
        _report(url, done, start, total, time.monotonic() - began)


def _report(url, done, start, total, elapsed):
    rate = (done - start) / elapsed if elapsed > 0 else 0.0
    if total:
        eta = (total - done) / rate if rate > 0 else float('inf')
        logger.info("%s: %.1f of %.1f MB (%.0f%%), %.1f MB/s, ETA %.0f s", os.path.basename(url), done / 1e6,
                    total / 1e6, 100 * done / total, rate / 1e6, eta)
    else:
        logger.info("%s: %.1f MB, %.1f MB/s", os.path.basename(url), done / 1e6, rate / 1e6)
