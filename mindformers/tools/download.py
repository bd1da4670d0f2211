"""Downloads into the cache: resumable, verified, never replacing a good file with a bad one.

`download_file(url)` puts a file at `$MINDFORMERS_CACHE/<cache_subdir>/<filename>` (default cache
`~/.cache/mindformers`); `fetch(url, target)` is the transfer underneath (the HuggingFace Hub client in `tools.hub`
uses it too). A transfer goes to `<file>.part` first; an interrupted one, even in an earlier process, resumes from
there with an HTTP Range request. The finished file is checked against its digest (sha256, or the git blob sha1 the
Hub declares for small files) and only then renamed into place. Processes fetching the same file take turns through
an exclusive lock on `<file>.lock`. With `MINDFORMERS_OFFLINE=1` nothing touches the network."""
import contextlib
import fcntl
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request

from mindformers.tools.logger import logger
from mindformers.tools.utils import cache_dir

CHUNK = 1 << 16
TRUE = ('1', 'true', 'True', 'yes', 'on')


class DownloadError(RuntimeError):
    """A file could not be fetched or verified; the message says which and what to do. `status`: the HTTP status
    when the server answered with an error, else None."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


def offline_mode():
    return os.environ.get('MINDFORMERS_OFFLINE', '0') in TRUE


def file_digest(path, algorithm='sha256', chunk=1 << 20):
    """Hex digest of a file: 'sha256', or 'git-sha1' (git's blob id: sha1 of `blob <size>\\0` + content)."""
    digest = hashlib.sha256() if algorithm == 'sha256' else hashlib.sha1()
    if algorithm == 'git-sha1':
        digest.update(b'blob %d\0' % os.path.getsize(path))
    elif algorithm != 'sha256':
        raise ValueError(f"unknown digest algorithm {algorithm!r} (sha256 or git-sha1)")
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(target):
    """Exclusive lock on `<target>.lock` while a process checks or fetches `target`."""
    with open(target + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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
    with file_lock(target):
        if os.path.isfile(target) and (sha256 is None or file_digest(target) == sha256):
            return target
        if offline:
            state = 'does not match its checksum' if os.path.isfile(target) else 'is not in the cache'
            raise DownloadError(f"{target} {state} and offline mode (MINDFORMERS_OFFLINE=1) forbids downloading "
                                f"{url}; put the file there or unset MINDFORMERS_OFFLINE")
        return fetch(url, target, ('sha256', sha256) if sha256 else None, timeout=timeout, progress=progress)


def fetch(url, target, digest=None, headers=None, timeout=30, progress=True):
    """Download `url` to `target` through `<target>.part` (continued when present) and return `target`.

    `digest`: (algorithm, hex) the content must have (see `file_digest`); a mismatch deletes the transfer and
    leaves an existing `target` as it was. `headers`: extra request headers (e.g. Authorization: it is not sent on
    when the server redirects to another host). The caller holds `file_lock(target)`."""
    part = target + '.part'
    _fetch(url, part, timeout, progress, headers or {})
    if digest is not None:
        algorithm, expected = digest
        actual = file_digest(part, algorithm)
        if actual != expected.lower():
            os.remove(part)  # a bad transfer must not be resumed
            raise DownloadError(f"checksum mismatch for {url}: expected {algorithm} {expected}, got {actual}; the "
                                f"download was discarded" + (f" and the cached {target} left as it was"
                                                               if os.path.isfile(target) else ""))
    os.replace(part, target)
    return target


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Follows redirects, dropping the Authorization header when the new location is on another host (a CDN)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlparse(newurl).netloc != urllib.parse.urlparse(req.full_url).netloc:
            new.remove_header('Authorization')
        return new


_OPENER = urllib.request.build_opener(_SameHostAuth)


def open_url(url, headers=None, timeout=30):
    """The response to GET `url`; HTTP errors and network failures raise DownloadError naming the URL (`status`
    set for the former)."""
    try:
        return _OPENER.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"downloading {url} failed: HTTP {err.code} {err.reason}", status=err.code) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, 'reason', err)
        raise DownloadError(f"downloading {url} failed: {reason}") from None


def _fetch(url, part, timeout, progress, headers):
    """Download `url` into `part`, continuing an existing partial file when the server supports ranges."""
    start = os.path.getsize(part) if os.path.isfile(part) else 0
    try:
        response = open_url(url, {**headers, 'Range': f'bytes={start}-'} if start else headers, timeout)
    except DownloadError as err:
        if err.status == 416 and start:  # nothing left to send: the partial file is complete (verified next)
            return
        raise
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
