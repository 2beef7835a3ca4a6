"""A small Hugging Face Hub stand-in on loopback, for tests that run the real ``huggingface_hub`` client.

It speaks the part of the Hub REST API that ``huggingface_hub`` (checked on 2.4.0) uses to create a
repo, upload (preupload answering "regular", then an NDJSON commit), create a branch, read repo
info, list the tree and refs, and download (``HEAD``/``GET`` on ``/{repo}/resolve/{rev}/{path}``
with ``ETag``, ``X-Repo-Commit``, ``Content-Length`` and byte ranges). Errors carry the
``X-Error-Code`` header the client maps to ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` /
``EntryNotFoundError``. Private repos answer 401 ``RepoNotFound`` without the owner's token, as the
Hub does. Everything is in memory; nothing leaves 127.0.0.1.

Fault injection for download tests: ``server.faults["path/in/repo"] = ["drop", "error"]`` makes the
next GET of that file send its headers and half its body and then close the connection ("drop"),
the one after answer 500 ("error"); each GET consumes one entry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

TOKENS = {"hf_tester_write": "tester", "hf_other_user": "other"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    owner: str
    private: bool
    commits: dict = field(default_factory=dict)  # sha -> {path: bytes}
    branches: dict = field(default_factory=dict)  # name -> sha

    def resolve(self, revision: str):
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        return None


class HubState:
    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.faults: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def new_commit(self, repo: Repo, files: dict) -> str:
        sha = hashlib.sha1(f"{repo.repo_id}{time.time_ns()}{len(repo.commits)}".encode()).hexdigest()
        repo.commits[sha] = files
        return sha


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubServer"

    def log_message(self, *args):  # keep test output clean
        pass

    # ---- helpers --------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def user(self):
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return TOKENS.get(auth[7:].strip(), False)  # False: a token that is not valid
        return None

    def send(self, status: int, body=b"", headers=None, content_type="application/json"):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status: int, code: str | None, message: str, headers=None):
        h = dict(headers or {})
        if code:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = message
        self.send(status, {"error": message}, h)

    def body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def repo_or_error(self, repo_type: str, repo_id: str, write: bool = False):
        repo = self.state.repos.get((repo_type, repo_id))
        user = self.user()
        if user is False:
            self.error(401, None, "Invalid credentials in Authorization header")
            return None
        if repo is None or (repo.private and user != repo.owner):
            self.error(401 if repo is not None or user is None else 404, "RepoNotFound", "Repository not found")
            return None
        if write and user != repo.owner:
            self.error(403, None, "You don't have the rights to write to this repo")
            return None
        return repo

    # ---- routing --------------------------------------------------------------------------------
    def do_HEAD(self):
        self.route()

    def do_GET(self):
        self.route()

    def do_POST(self):
        self.route()

    def route(self):
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        with self.state.lock:
            self.state.requests.append((self.command, url.path))
        try:
            if parts[:1] == ["api"]:
                return self.api(parts[1:], query)
            prefix = "model"
            if parts[0] in ("datasets", "spaces"):
                prefix, parts = parts[0][:-1], parts[1:]
            if len(parts) >= 5 and parts[2] == "resolve":
                return self.resolve(prefix, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            self.error(404, None, f"no route for {url.path}")
        except ConnectionError:
            self.close_connection = True

    def api(self, parts, query):
        if parts == ["whoami-v2"]:
            user = self.user()
            if not user:
                return self.error(401, None, "Invalid credentials in Authorization header")
            return self.send(200, {"type": "user", "name": user, "auth": {"accessToken": {"role": "write"}}})
        if parts == ["validate-yaml"]:
            self.body()
            return self.send(200, {})
        if parts == ["repos", "create"]:
            return self.create_repo()
        if len(parts) < 3 or parts[0] not in ("models", "datasets", "spaces"):
            return self.error(404, None, "unknown api route")
        repo_type, repo_id, rest = parts[0][:-1], f"{parts[1]}/{parts[2]}", parts[3:]
        if self.command == "POST":
            self.body_bytes = self.body()
        repo = self.repo_or_error(repo_type, repo_id, write=self.command == "POST")
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            revision = "/".join(rest[1:]) or "main"
            return self.repo_info(repo, revision)
        if rest[0] == "preupload":
            return self.preupload(repo, "/".join(rest[1:]))
        if rest[0] == "commit":
            return self.commit(repo, "/".join(rest[1:]))
        if rest[0] == "branch":
            return self.create_branch(repo, "/".join(rest[1:]))
        if rest[0] == "tree":
            return self.tree(repo, rest[1], "/".join(rest[2:]), query)
        if rest[0] == "refs":
            return self.send(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                                                for b, s in repo.branches.items()],
                                   "converts": [], "tags": [], "pullRequests": []})
        return self.error(404, None, "unknown repo api route")

    # ---- endpoints ------------------------------------------------------------------------------
    def create_repo(self):
        payload = json.loads(self.body() or b"{}")
        user = self.user()
        if not user:
            return self.error(401, None, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or user
        if namespace != user:
            return self.error(403, None, f"You cannot create repos in {namespace}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.server.endpoint}/{prefix}{repo_id}"
        with self.state.lock:
            if (repo_type, repo_id) in self.state.repos:
                self.send(409, {"error": "You already created this model repo", "url": url},
                          {"X-Error-Message": "You already created this model repo"})
                return
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = Repo(repo_id, repo_type, user, private)
            sha = self.state.new_commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            repo.branches["main"] = sha
            self.state.repos[(repo_type, repo_id)] = repo
        self.send(200, {"url": url, "name": repo_id})

    def repo_info(self, repo, revision):
        sha = repo.resolve(revision)
        if sha is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.commits[sha]
        self.send(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                        "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "downloads": 0,
                        "likes": 0, "lastModified": "2025-01-01T00:00:00.000Z", "author": repo.owner})

    def preupload(self, repo, revision):
        sha = repo.resolve(revision)
        existing = repo.commits[sha] if sha else {}
        payload = json.loads(self.body_bytes or b"{}")
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_sha1(existing[f["path"]]) if f["path"] in existing else None}
                 for f in payload.get("files", [])]
        self.send(200, {"files": files, "commitOid": sha})

    def commit(self, repo, revision):
        lines = [json.loads(line) for line in self.body_bytes.splitlines() if line.strip()]
        with self.state.lock:
            sha = repo.resolve(revision)
            if sha is None:
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files = dict(repo.commits[sha])
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                elif key != "header":
                    return self.error(400, None, f"this test server only accepts regular files, got {key}")
            new = self.state.new_commit(repo, files)
            repo.branches[revision if revision in repo.branches else "main"] = new
        self.send(200, {"commitUrl": f"{self.server.endpoint}/{repo.repo_id}/commit/{new}", "commitOid": new,
                        "pullRequestUrl": None})

    def create_branch(self, repo, branch):
        payload = json.loads(self.body_bytes or b"{}")
        with self.state.lock:
            if branch in repo.branches:
                return self.error(409, None, "Reference already exists")
            start = repo.resolve(payload.get("startingPoint") or "main")
            if start is None:
                return self.error(404, "RevisionNotFound", "Invalid starting point")
            repo.branches[branch] = start
        self.send(200, {})

    def tree(self, repo, revision, path, query):
        sha = repo.resolve(revision)
        if sha is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.commits[sha]
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.rstrip("/") + "/" if path else ""
        out, dirs = [], set()
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):]
            if "/" in rel:
                top = rel.split("/")[0]
                for i, _ in enumerate(rel.split("/")[:-1] if recursive else [top]):
                    dirs.add(prefix + "/".join(rel.split("/")[: i + 1]))
                if not recursive:
                    continue
            out.append({"type": "file", "path": p, "size": len(files[p]), "oid": git_blob_sha1(files[p])})
        out += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(dirs)]
        if path and not out and path not in files:
            return self.error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": sha})
        self.send(200, out)

    def resolve(self, repo_type, repo_id, revision, path):
        repo = self.repo_or_error(repo_type, repo_id)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.commits[sha]
        if path not in files:
            return self.error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": sha})
        data = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        fault = None
        if self.command == "GET":
            with self.state.lock:
                queue = self.state.faults.get(path)
                if queue:
                    fault = queue.pop(0)
        if fault == "error":
            return self.error(500, None, "Internal Error (injected)")
        status, start = 200, 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if fault == "drop":
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: max(1, len(body) // 2)])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.send(status, body, headers, content_type="application/octet-stream")


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), Handler)
        self.state = HubState()
        self.endpoint = f"http://{host}:{self.server_address[1]}"
        self._thread = None

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


if __name__ == "__main__":  # python -m tests.hub_server: run it by hand
    s = HubServer(port=8765).start()
    print(f"HF_ENDPOINT={s.endpoint}  tokens: {', '.join(TOKENS)}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        s.stop()
