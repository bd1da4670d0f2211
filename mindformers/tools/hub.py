"""Files of a HuggingFace Hub model repository, in the cache: the Hub's HTTP protocol spoken with `tools.download`.

One request lists a revision (`GET <endpoint>/api/models/<repo>/revision/<revision>?blobs=true`: the commit, and
every file with its size and content hash: the LFS sha256 for large files, the git blob sha1 for small ones); each
file then comes from `<endpoint>/<repo>/resolve/<commit>/<file>`, resumable, verified against a pinned sha256 where
the caller gives one, else against that declared hash. Files land in
`$MINDFORMERS_CACHE/hub/<org>--<name>/<revision>/` with `.manifest.json` (commit, and each file's size and hash).

Environment, as HuggingFace's own tools read it: `HF_ENDPOINT` (default https://huggingface.co), `HF_TOKEN` (else
`HUGGING_FACE_HUB_TOKEN`, else the token file `hf auth login` writes under `HF_HOME`) for gated repositories, and
`HF_HUB_OFFLINE=1` as well as `MINDFORMERS_OFFLINE=1` for offline mode: only cached files are used and a missing one
is reported by name with the folder to put it in."""
import json
import os
import urllib.parse

from mindformers.tools.download import DownloadError, TRUE, fetch, file_lock, open_url, offline_mode
from mindformers.tools.file_io import write_json_atomic
from mindformers.tools.logger import logger
from mindformers.tools.utils import cache_dir

DEFAULT_ENDPOINT = 'https://huggingface.co'
MANIFEST = '.manifest.json'
CONFIG = 'config.json'
# HF weight layouts, preferred first: a sharded set is its index plus the shard files it names
WEIGHT_FILES = ('model.safetensors.index.json', 'model.safetensors', 'pytorch_model.bin.index.json',
                'pytorch_model.bin')
WEIGHTS_WANTED = ('model.safetensors (or model.safetensors.index.json and its shards, or pytorch_model.bin, or '
                  'pytorch_model.bin.index.json and its shards)')


def endpoint():
    return os.environ.get('HF_ENDPOINT', DEFAULT_ENDPOINT).rstrip('/')


def hub_offline():
    """Offline mode: MINDFORMERS_OFFLINE=1 or HF_HUB_OFFLINE=1."""
    return offline_mode() or os.environ.get('HF_HUB_OFFLINE', '0') in TRUE


def hub_token():
    """The access token for gated repositories: HF_TOKEN, HUGGING_FACE_HUB_TOKEN, or HuggingFace's token file."""
    for name in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN'):
        if os.environ.get(name):
            return os.environ[name].strip()
    home = os.environ.get('HF_HOME') or os.path.join(os.path.expanduser('~'), '.cache', 'huggingface')
    path = os.environ.get('HF_TOKEN_PATH') or os.path.join(home, 'token')
    try:
        with open(path, encoding='utf-8') as f:
            return f.read().strip() or None
    except OSError:
        return None


class HubRepo:
    """One revision of a Hub model repository and its cached files.

    `pins`: {file name: sha256} that the content must have whatever the server declares. `offline`: default
    `hub_offline()`."""

    def __init__(self, repo, revision='main', pins=None, offline=None):
        if not isinstance(repo, str) or repo.count('/') != 1:
            raise ValueError(f"a Hub repository is named '<organisation>/<name>', got {repo!r}")
        self.repo, self.revision = repo, revision
        self.pins = {k: v.lower() for k, v in (pins or {}).items()}
        self.offline = hub_offline() if offline is None else offline
        self.directory = cache_dir('hub', repo.replace('/', '--'), revision)
        self.commit, self._files, self._network_error = revision, None, None

    # -- what the revision holds ----------------------------------------------------------------------------------

    def _manifest(self):
        try:
            with open(os.path.join(self.directory, MANIFEST), encoding='utf-8') as f:
                data = json.load(f)
            return data if isinstance(data, dict) and isinstance(data.get('files'), dict) else None
        except (OSError, ValueError):
            return None

    def _headers(self):
        token = hub_token()
        return {'Authorization': f'Bearer {token}'} if token else {}

    def _listing(self):
        """(commit, {file: [size, algorithm, hex]}) from the Hub."""
        url = (f"{endpoint()}/api/models/{self.repo}/revision/{urllib.parse.quote(self.revision, safe='')}"
               f"?blobs=true")
        with open_url(url, self._headers()) as response:
            data = json.loads(response.read().decode('utf-8'))
        files = {}
        for sibling in data.get('siblings') or []:
            lfs = sibling.get('lfs') or {}
            if lfs.get('sha256'):
                files[sibling['rfilename']] = [lfs.get('size', sibling.get('size')), 'sha256', lfs['sha256']]
            else:
                files[sibling['rfilename']] = [sibling.get('size'), 'git-sha1', sibling.get('blobId')]
        return data.get('sha') or self.revision, files

    def files(self):
        """{file name: [size, algorithm, hex] or None} of the revision: the Hub's listing online; offline (or when
        the Hub cannot be reached) the cached manifest's, or just what the folder holds (files put there by
        hand)."""
        if self._files is not None:
            return self._files
        if not self.offline:
            try:
                self.commit, self._files = self._listing()
                return self._files
            except DownloadError as err:
                if err.status is not None:
                    raise self._explain(err, 'the file list') from None
                self._network_error = str(err)
                logger.warning("%s; using the cached files of %s", err, self.repo)
        manifest = self._manifest() or {}
        self.commit = manifest.get('commit', self.revision)
        present = {f: None for f in os.listdir(self.directory) if not f.startswith('.') and not
                   f.endswith(('.part', '.lock'))}
        self._files = {**present, **manifest.get('files', {})}
        return self._files

    def weight_files(self):
        """config.json and the HF weights of the revision (the first layout of WEIGHT_FILES it holds; a sharded
        one's shards are read off its index, downloaded first)."""
        files = self.files()
        found = next((name for name in WEIGHT_FILES if name in files), None)
        if found is None:
            self._missing([CONFIG, WEIGHTS_WANTED] if CONFIG not in files else [WEIGHTS_WANTED])
        if not found.endswith('.index.json'):
            return [CONFIG, found]
        index = self.download([found])[0]
        try:
            with open(index, encoding='utf-8') as f:
                shards = sorted(set(json.load(f)['weight_map'].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DownloadError(f"{index} (from {self.repo}) is not a weight index: it needs a 'weight_map' of "
                                f"tensor name -> shard file") from None
        return [CONFIG, found] + shards

    # -- fetching ---------------------------------------------------------------------------------------------------

    def download(self, names):
        """Paths of `names` in the cache folder, each downloaded (or resumed) and verified unless the cached copy
        has the hash the revision declares. Offline, missing files raise one DownloadError naming them all."""
        files = self.files()
        absent = [name for name in names if name not in files or
                  (self.offline or self._network_error) and not self._cached(name, files[name])]
        if absent:
            self._missing(absent)
        paths = [self._one(name, files[name]) for name in names]
        if not (self.offline or self._network_error):
            self._record()
        return paths

    def _cached(self, name, entry):
        path = os.path.join(self.directory, name)
        if not os.path.isfile(path):
            return False
        recorded = (self._manifest() or {}).get('files', {}).get(name)
        if entry is None or recorded is None:
            return entry is None  # hand-placed files are taken as they are
        return list(recorded) == list(entry) and os.path.getsize(path) == recorded[0]

    def _one(self, name, entry):
        path = os.path.join(self.directory, name)
        if self.offline or self._network_error or self._cached(name, entry):
            return path
        digest = ('sha256', self.pins[name]) if name in self.pins else \
            (entry[1], entry[2]) if entry and entry[2] else None
        if digest is None:
            logger.warning("%s of %s has no declared hash: downloaded unverified", name, self.repo)
        url = f"{endpoint()}/{self.repo}/resolve/{self.commit}/{urllib.parse.quote(name)}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with file_lock(path):
            if self._cached(name, entry):  # another process fetched it meanwhile
                return path
            try:
                fetch(url, path, digest, headers=self._headers())
            except DownloadError as err:
                raise self._explain(err, name) from None
            self._record(name, entry)
        return path

    def _record(self, name=None, entry=None):
        """Note `name` (just verified) in the manifest, which follows the listed commit; each entry describes the
        file on disk (one whose hash changed on the Hub keeps its old entry until it is downloaded again)."""
        manifest = self._manifest() or {'repo': self.repo, 'revision': self.revision, 'files': {}}
        if manifest.get('commit') == self.commit and name is None:
            return
        manifest['commit'] = self.commit
        if name is not None:
            manifest['files'][name] = entry
        write_json_atomic(os.path.join(self.directory, MANIFEST), manifest)

    # -- messages ---------------------------------------------------------------------------------------------------

    def _explain(self, err, what):
        if err.status in (401, 403):
            token = hub_token()
            state = ("no token was given" if not token else
                     "the token given has no access" if err.status == 403 else "the token given was refused")
            return DownloadError(f"{self.repo} is gated or private (HTTP {err.status} for {what}; {state}): accept "
                                 f"its license at {endpoint()}/{self.repo} with your account, then set HF_TOKEN to an "
                                 f"access token of that account", status=err.status)
        if err.status == 404:
            return DownloadError(f"{self.repo}: {what} not found at revision {self.revision!r} ({endpoint()}); "
                                 f"check the repository name and revision", status=404)
        return err

    def _missing(self, names):
        if not (self.offline or self._network_error):
            raise DownloadError(f"{self.repo} (revision {self.revision}, {endpoint()}) has no {', '.join(names)}", 404)
        why = (f"offline mode ({'MINDFORMERS_OFFLINE' if offline_mode() else 'HF_HUB_OFFLINE'}=1)" if self.offline
               else f"the Hub could not be reached ({self._network_error})")
        raise DownloadError(f"{self.repo} (revision {self.revision}): {', '.join(names)} not in the cache and "
                            f"{why}; put the repository's files into {self.directory} (e.g. `hf download "
                            f"{self.repo} --revision {self.revision} --local-dir {self.directory}`)"
                            + (" or unset the offline variable" if self.offline else ""))
