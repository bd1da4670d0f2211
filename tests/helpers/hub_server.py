"""A HuggingFace Hub stand-in on loopback for download tests: the parts of the Hub's HTTP protocol a client needs.

    GET /api/models/<org>/<name>/revision/<rev>   JSON: sha (commit), siblings [{rfilename, size, blobId, lfs}], gated
    GET|HEAD /<org>/<name>/resolve/<rev>/<file>   the file (Range requests answered with 206) and the headers
        X-Repo-Commit, ETag (git blob sha1; the sha256 for LFS files), X-Linked-Etag + X-Linked-Size (LFS files),
        Accept-Ranges, Content-Length

Files of at least LFS_MIN bytes are LFS files (declared by their sha256), smaller ones are declared by their git blob
sha1, as on the Hub. Switches: `cut[file] = n` ends the next transfer of `file` after n bytes (the headers announce
all of it); `corrupt[file] = bytes` serves those bytes in place of the declared content; a repository added with
`token=` answers its files with 401 without `Authorization: Bearer <token>` and 403 with another token (its listing
stays public, as on the Hub); `redirect_lfs = True` answers LFS files with a 302 to `/cdn/<sha256>` on another host
name (`localhost` for `127.0.0.1`), as the Hub sends them to its CDN. `requests` records (method, path, Range
header); `authorized` the paths requested with an Authorization header."""
import hashlib
import http.server
import json
import threading
import urllib.parse

LFS_MIN = 1024


def git_blob_sha1(data):
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class HubServer:
    """`add_repo(repo, {file: bytes}, token=None)` publishes a revision 'main' (a new commit each call)."""

    def __init__(self):
        self.repos, self.cut, self.corrupt, self.requests, self.authorized = {}, {}, {}, [], []
        self.redirect_lfs = False
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _handler(self))
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add_repo(self, repo, files, token=None):
        digest = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
                              .encode()).hexdigest()
        self.repos[repo] = {'files': dict(files), 'token': token, 'commit': digest}
        return digest

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def listing(self, repo):
        entry = self.repos[repo]
        siblings = []
        for name, data in sorted(entry['files'].items()):
            sibling = {'rfilename': name, 'size': len(data), 'blobId': git_blob_sha1(data)}
            if len(data) >= LFS_MIN:
                sibling['lfs'] = {'sha256': hashlib.sha256(data).hexdigest(), 'size': len(data), 'pointerSize': 134}
            siblings.append(sibling)
        return {'id': repo, 'modelId': repo, 'sha': entry['commit'], 'siblings': siblings,
                'gated': 'manual' if entry['token'] else False, 'private': False}


def _handler(server):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args):
            pass

        def _json(self, code, data):
            body = json.dumps(data).encode()
            self.send_response(code)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            if self.command != 'HEAD':
                self.wfile.write(body)

        def _error(self, code, message, error_code=None):
            self.send_response(code)
            body = json.dumps({'error': message}).encode()
            if error_code:
                self.send_header('X-Error-Code', error_code)
            self.send_header('X-Error-Message', message)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            if self.command != 'HEAD':
                self.wfile.write(body)

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            server.requests.append((self.command, self.path, self.headers.get('Range')))
            if self.headers.get('Authorization'):
                server.authorized.append(self.path)
            path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
            parts = path.strip('/').split('/')
            if parts[0] == 'cdn' and len(parts) == 2:
                found = [(name, data) for entry in server.repos.values() for name, data in entry['files'].items()
                         if hashlib.sha256(data).hexdigest() == parts[1]]
                if not found:
                    return self._error(404, 'Not Found')
                return self._send(found[0][0], found[0][1], {})
            if parts[:2] == ['api', 'models'] and len(parts) >= 6 and parts[4] == 'revision':
                repo = '/'.join(parts[2:4])
                if repo not in server.repos:
                    return self._error(404, 'Repository not found', 'RepoNotFound')
                return self._json(200, server.listing(repo))
            if len(parts) >= 5 and parts[2] == 'resolve':
                return self._file('/'.join(parts[:2]), parts[3], '/'.join(parts[4:]))
            return self._error(404, 'Not Found')

        def _file(self, repo, revision, name):
            entry = server.repos.get(repo)
            if entry is None:
                return self._error(404, 'Repository not found', 'RepoNotFound')
            if entry['token']:
                given = self.headers.get('Authorization', '')
                if not given:
                    return self._error(401, f'Access to model {repo} is restricted. You must have access to it and '
                                            f'be authenticated to access it. Please log in.', 'GatedRepo')
                if given != f"Bearer {entry['token']}":
                    return self._error(403, f'Access to model {repo} is restricted and you are not in the '
                                            f'authorized list.', 'GatedRepo')
            if revision not in ('main', entry['commit']):
                return self._error(404, 'Revision not found', 'RevisionNotFound')
            if name not in entry['files']:
                return self._error(404, 'Entry not found', 'EntryNotFound')
            declared = entry['files'][name]
            lfs = len(declared) >= LFS_MIN
            etag = hashlib.sha256(declared).hexdigest() if lfs else git_blob_sha1(declared)
            headers = {'X-Repo-Commit': entry['commit'], 'ETag': f'"{etag}"'}
            if lfs:
                headers.update({'X-Linked-Etag': f'"{etag}"', 'X-Linked-Size': str(len(declared))})
            if lfs and server.redirect_lfs:
                self.send_response(302)
                host = self.headers.get('Host', '').replace('127.0.0.1', 'localhost')
                self.send_header('Location', f'http://{host}/cdn/{etag}')
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header('Content-Length', '0')
                self.end_headers()
                return None
            return self._send(name, declared, headers)

        def _send(self, name, declared, headers):
            data = server.corrupt.get(name, declared)
            start, ranged = 0, self.headers.get('Range')
            if ranged:
                start = int(ranged.split('=')[1].split('-')[0])
                if start >= len(data):
                    return self._error(416, 'Range Not Satisfiable')
                self.send_response(206)
                self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
            else:
                self.send_response(200)
            body = data[start:]
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header('Accept-Ranges', 'bytes')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            if self.command == 'HEAD':
                return None
            limit = server.cut.pop(name, None)
            if limit is not None:
                self.wfile.write(body[:max(limit - start, 0)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return None
            self.wfile.write(body)
            return None

    return Handler
