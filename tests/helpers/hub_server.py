"""A small Hugging Face Hub look-alike on loopback, for testing pushes and downloads without the network.

It implements the subset of the Hub HTTP API that `huggingface_hub` 2.x (``create_repo``, ``create_commit`` with
regular and LFS files, ``repo_info``, ``whoami``) and transformers' ``from_pretrained`` (``resolve/`` downloads with
the ``X-Repo-Commit`` / ``ETag`` / ``Content-Length`` headers ``hf_hub_download`` reads, HEAD requests and the
``X-Error-Code`` values ``hf_raise_for_status`` maps to exceptions) use. Everything it receives is kept in memory,
so a test can check what was uploaded.

Tokens: ``Bearer <token>`` must be one of ``HubServer.tokens`` for writes and for private repos; anything else is
answered 401 like the Hub does for a revoked or mistyped token. Run clients with ``HF_HUB_DISABLE_XET=1`` so binary
files take the LFS path (the Xet protocol is not implemented).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


# Files whose first bytes look binary, or with these suffixes, are LFS on the Hub (its .gitattributes).
LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".pt", ".h5", ".onnx")


@dataclass
class Repo:
    private: bool
    owner: str
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (oid, files) newest last

    @property
    def head(self) -> tuple[str, dict[str, bytes]]:
        return self.commits[-1] if self.commits else ("0" * 40, {})


class HubServer:
    """Start with ``with HubServer() as hub: os.environ["HF_ENDPOINT"] = hub.url``."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = tokens or {"hf_test_write_token": "tester"}
        self.repos: dict[str, Repo] = {}
        self.lfs_blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) log
        self.commit_payloads: list[list[dict]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        """Files at the head of `repo_id`."""
        return dict(self.repos[repo_id].head[1])


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        # -- helpers -------------------------------------------------------------------------------------------
        def _user(self) -> str | None | bool:
            """The user of a valid token, None without a token, False for a rejected one."""
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return None
            return hub.tokens.get(auth[len("Bearer ") :], False)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str | None, message: str, head: bool = False):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers, head=head)

        def _repo(self, repo_id: str, write: bool, head: bool = False) -> Repo | None:
            user = self._user()
            if user is False:
                self._error(401, None, "Invalid credentials in Authorization header", head)
                return None
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and user != repo.owner):
                self._error(401 if user is None else 404, "RepoNotFound", "Repository not found", head)
                return None
            if write and user != repo.owner:
                self._error(403, None, "You don't have the rights to write to this repository", head)
                return None
            return repo

        # -- routes --------------------------------------------------------------------------------------------
        def do_HEAD(self):
            self._route("HEAD")

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def _route(self, method: str) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((method, path))
            parts = path.strip("/").split("/")
            try:
                if method == "POST" and path == "/api/repos/create":
                    return self._create_repo()
                if method == "POST" and path == "/api/validate-yaml":
                    self._body()
                    return self._send(200, {"errors": [], "warnings": []})
                if method == "GET" and path == "/api/whoami-v2":
                    user = self._user()
                    if not user:
                        return self._error(401, None, "Invalid credentials in Authorization header")
                    return self._send(200, {"type": "user", "name": user, "auth": {"type": "access_token"}})
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id, rest = "/".join(parts[2:4]), parts[4:]
                    if method == "POST" and rest[:1] == ["preupload"]:
                        return self._preupload(repo_id)
                    if method == "POST" and rest[:1] == ["commit"]:
                        return self._commit(repo_id)
                    if method == "GET" and (not rest or rest[0] == "revision"):
                        return self._info(repo_id)
                    if method == "GET" and rest[:1] == ["tree"]:
                        return self._tree(repo_id, "/".join(rest[2:]))
                if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[-1] == "batch":
                    return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
                if method == "PUT" and parts[0] == "lfs-upload":
                    return self._lfs_put(parts[1])
                if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                    return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), method == "HEAD")
                self._error(404, None, f"hub_server: no route for {method} {path}", method == "HEAD")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _create_repo(self):
            payload = json.loads(self._body())
            user = self._user()
            if not user:
                return self._error(401, None, "Invalid credentials in Authorization header")
            owner = payload.get("organization") or user
            if owner != user:
                return self._error(403, None, f"You don't have the rights to create a model under {owner}")
            repo_id = f"{owner}/{payload['name']}"
            with hub._lock:
                if repo_id in hub.repos:  # the Hub answers 409 with the URL; create_repo(exist_ok=True) reads it
                    message = "You already created this model repo"
                    return self._send(
                        409, {"error": message, "url": f"{hub.url}/{repo_id}"}, {"X-Error-Message": message}
                    )
                private = payload.get("private") or payload.get("visibility") == "private"
                hub.repos[repo_id] = Repo(private=bool(private), owner=user)
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _preupload(self, repo_id: str):
            payload = json.loads(self._body())
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return
            files = []
            for item in payload["files"]:
                sample = base64.b64decode(item["sample"])
                lfs = item["path"].endswith(LFS_SUFFIXES) or b"\x00" in sample
                existing = repo.head[1].get(item["path"])
                oid = _git_oid(existing) if existing is not None else None
                files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                              "shouldIgnore": False, "oid": oid})  # fmt: skip
            self._send(200, {"files": files, "commitOid": repo.head[0]})

        def _lfs_batch(self, repo_id: str):
            payload = json.loads(self._body())
            if self._repo(repo_id, write=True) is None:
                return
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs_blobs:
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects})

        def _lfs_put(self, oid: str):
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, "sha256 of the uploaded content does not match the oid")
            hub.lfs_blobs[oid] = data
            self._send(200)

        def _commit(self, repo_id: str):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return
            files = dict(repo.head[1])
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs_blobs:
                        return self._error(400, None, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = hub.lfs_blobs[value["oid"]]
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
            oid = hashlib.sha1(json.dumps([repo.head[0], sorted(files)]).encode() + b"".join(
                hashlib.sha1(files[k]).digest() for k in sorted(files))).hexdigest()  # fmt: skip
            with hub._lock:
                repo.commits.append((oid, files))
                hub.commit_payloads.append(lines)
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None})  # fmt: skip

        def _info(self, repo_id: str):
            repo = self._repo(repo_id, write=False)
            if repo is None:
                return
            sha, files = repo.head
            self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                             "siblings": [{"rfilename": name} for name in sorted(files)], "tags": []})  # fmt: skip

        def _tree(self, repo_id: str, prefix: str):
            repo = self._repo(repo_id, write=False)
            if repo is None:
                return
            files = repo.head[1]
            entries = [{"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
                       for name, data in sorted(files.items()) if not prefix or name.startswith(prefix + "/")]  # fmt: skip
            if prefix and not entries:
                return self._error(404, "EntryNotFound", f"{prefix} does not exist")
            self._send(200, entries)

        def _resolve(self, repo_id: str, revision: str, filename: str, head: bool):
            repo = self._repo(repo_id, write=False, head=head)
            if repo is None:
                return
            sha, files = repo.head
            if revision not in ("main", sha):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            if filename not in files:
                return self._error(404, "EntryNotFound", f"{filename} does not exist at {revision}", head)
            data = files[filename]
            is_lfs = filename.endswith(LFS_SUFFIXES)
            etag = hashlib.sha256(data).hexdigest() if is_lfs else _git_oid(data)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
            if is_lfs:
                headers["X-Linked-Etag"] = f'"{etag}"'
                headers["X-Linked-Size"] = str(len(data))
            self._send(200, data, headers, head=head)

    return Handler


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def use_hub(monkeypatch, hub: HubServer, token: str | None = "hf_test_write_token") -> None:
    """Point this process's huggingface_hub at `hub` (its constants are read at import, so patch them)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the Xet protocol is not implemented here
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
