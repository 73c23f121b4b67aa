"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1, so `push_to_hub` runs through huggingface_hub's own client
code without the network. It serves just what `HfApi.create_repo` and `HfApi.upload_folder` (non-Xet path) call:

    POST /api/repos/create                                  create a repo
    POST /api/validate-yaml                                 check a README's metadata (always fine)
    POST /api/models/{repo_id}/preupload/{revision}         *.safetensors go through LFS, the rest inline
    POST /{repo_id}.git/info/lfs/objects/batch              where to PUT each LFS object
    PUT  /lfs/{oid}                                         the object's bytes (sha256-checked)
    POST /api/models/{repo_id}/commit/{revision}            ndjson: header, inline files, LFS pointers

Anything else answers 404, a malformed request 400; both are recorded in `unexpected`, except the client's
best-effort fetch of its agent registry (declined, so that nothing is cached from the fake).
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
DECLINED = {"GET /api/agent-harnesses"}
LIFETIME_S = 120  # stops by itself after this, even if a test never exits its `with` block


class FakeHub:
    """`with FakeHub() as hub:` serves on a free port of 127.0.0.1 at `hub.endpoint` until the block ends.
    `hub.repos[repo_id][path]` holds the committed bytes, `hub.lfs_uploads` the oids PUT through LFS and
    `hub.requests` (method, path, Authorization header) of each request."""

    def __init__(self):
        self.repos, self.lfs_objects, self.lfs_uploads = {}, {}, []
        self.requests, self.unexpected = [], []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self._stop_timer = threading.Timer(LIFETIME_S, self.server.shutdown)

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self._stop_timer.start()
        return self

    def __exit__(self, *exc_info):
        self._stop_timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------------ routes

    def create_repo(self, body, **_):
        repo_id = f"{body['organization']}/{body['name']}"
        self.repos.setdefault(repo_id, {})
        return {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}

    def validate_yaml(self, body, **_):
        return {"errors": [], "warnings": []}

    def preupload(self, body, repo, **_):
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                "shouldIgnore": False,
            }
            for f in body["files"]
        ]
        return {"files": files}

    def lfs_batch(self, body, **_):
        objects = [
            {**obj, "actions": {"upload": {"href": f"{self.endpoint}/lfs/{obj['oid']}"}}} for obj in body["objects"]
        ]
        return {"transfer": "basic", "objects": objects}

    def lfs_upload(self, data, oid, **_):
        if hashlib.sha256(data).hexdigest() != oid:
            raise ValueError(f"LFS object {oid} does not match its content")
        self.lfs_objects[oid] = data
        self.lfs_uploads.append(oid)
        return {}

    def commit(self, data, repo, **_):
        files = self.repos[repo]
        for line in data.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "lfsFile":
                files[item["value"]["path"]] = self.lfs_objects[item["value"]["oid"]]
        oid = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
        return {"commitUrl": f"{self.endpoint}/{repo}/commit/{oid}", "commitOid": oid}

    ROUTES = [
        ("POST", r"/api/repos/create", "create_repo", True),
        ("POST", r"/api/validate-yaml", "validate_yaml", True),
        ("POST", rf"/api/models/{REPO}/preupload/[^/]+", "preupload", True),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch", True),
        ("PUT", r"/lfs/(?P<oid>[0-9a-f]{64})", "lfs_upload", False),
        ("POST", rf"/api/models/{REPO}/commit/[^/]+", "commit", False),
    ]

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _answer(self):
                data = self._read_body()
                path = self.path.split("?")[0]
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                for method, pattern, route, is_json in hub.ROUTES:
                    match = re.fullmatch(pattern, path)
                    if method == self.command and match:
                        try:
                            body = json.loads(data) if is_json else None
                            self._send(200, getattr(hub, route)(body=body, data=data, **match.groupdict()))
                        except Exception as error:  # a malformed request: 400, which the client does not retry
                            hub.unexpected.append(f"{self.command} {path}: {error!r}")
                            self._send(400, {"error": repr(error)})
                        return
                if f"{self.command} {path}" not in DECLINED:
                    hub.unexpected.append(f"{self.command} {path}")
                self._send(404, {"error": f"not served by the fake Hub: {self.command} {path}"})

            def _send(self, status: int, payload: dict):
                content = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args):
                pass  # keep pytest's output clean

        return Handler
