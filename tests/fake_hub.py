"""A local stand-in for the Hugging Face Hub and Kaggle's model API, for tests with no network.

One ThreadingHTTPServer on 127.0.0.1 (a free port), in a daemon thread of the test process; `FakeHub` is a context
manager that stops it, and it stops by itself after `lifetime` seconds whatever happens. It speaks the part of each
protocol the clients use for single files:

- Hugging Face (huggingface_hub.hf_hub_download, HF_ENDPOINT = `url`): HEAD / GET `/{repo}/resolve/{rev}/{file}`
  with X-Repo-Commit, ETag and Content-Length, byte ranges (206); 404 with X-Error-Code RepoNotFound /
  EntryNotFound.
- Kaggle (kagglehub.model_download with a file path): POST `/api/v1/models.ModelApiService/GetModelInstance`
  (the current version) and `.../DownloadModelInstanceVersion` (a 302 to `/kaggle-blobs/...`, as Kaggle redirects
  to storage), byte ranges; 404 for an unknown model or file.

Faults: `truncate[name] = n` sends the full Content-Length but closes the connection after half the bytes, on the
first n GETs of that file name; `requests` logs every request (method, path, Range).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "c0ffee0000000000000000000000000000000001"


class FakeHub:
    def __init__(self, lifetime: float = 120.0):
        self.hf: dict[str, dict[str, bytes]] = {}  # repo id -> file name -> bytes
        self.kaggle: dict[str, tuple[int, dict[str, bytes]]] = {}  # owner/model/framework/variation -> (version, files)
        self.truncate: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._serve(self, head=True)

            def do_GET(self):
                hub._serve(self, head=False)

            def do_POST(self):
                hub._kaggle_api(self)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that hangs up (the truncation) is no news
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.server.shutdown)
        self._timer.daemon = True

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _log(self, h, rng=None):
        with self._lock:
            self.requests.append((h.command, h.path, rng))

    @staticmethod
    def _not_found(h, code: str | None = None):
        body = json.dumps({"error": f"{code or 'not found'}: {h.path}", "code": 404}).encode()
        h.send_response(404)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _send_bytes(self, h, data: bytes, name: str, head: bool, extra: dict[str, str]):
        rng = h.headers.get("Range")
        self._log(h, rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        part = data[start:]
        h.send_response(206 if rng else 200)
        for k, v in extra.items():
            h.send_header(k, v)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(part)))
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        with self._lock:
            cut = self.truncate.get(name, 0) > 0 and len(part) > 1
            if cut:
                self.truncate[name] -= 1
        if cut:
            h.wfile.write(part[: len(part) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # the client sees the connection end before Content-Length bytes
            return
        h.wfile.write(part)

    # -- Hugging Face --------------------------------------------------------------------------------------------
    def _serve(self, h, head: bool):
        path = h.path.split("?")[0]
        if path.startswith("/kaggle-blobs/"):
            key, _, name = path[len("/kaggle-blobs/") :].rpartition("/")
            handle, _, version = key.rpartition("/")
            entry = self.kaggle.get(handle)
            if entry is None or str(entry[0]) != version or name not in entry[1]:
                self._log(h)
                return self._not_found(h)
            return self._send_bytes(h, entry[1][name], name, head, {"Content-Type": "application/octet-stream"})
        parts = path.strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            self._log(h)
            return self._not_found(h)
        repo, name = "/".join(parts[:2]), "/".join(parts[4:])
        if repo not in self.hf:
            self._log(h)
            return self._not_found(h, "RepoNotFound")
        if name not in self.hf[repo]:
            self._log(h)
            return self._not_found(h, "EntryNotFound")
        data = self.hf[repo][name]
        etag = hashlib.sha256(data).hexdigest()
        extra = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
        self._send_bytes(h, data, name, head, extra)

    # -- Kaggle ------------------------------------------------------------------------------------------------------
    def _kaggle_api(self, h):
        n = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(n) or b"{}")
        self._log(h)
        handle = "/".join(
            [body.get("ownerSlug", ""), body.get("modelSlug", ""), "jax", body.get("instanceSlug", "")]
        )  # the fake serves the jax framework only
        entry = self.kaggle.get(handle)
        method = h.path.rsplit("/", 1)[-1]
        if entry is None:
            return self._not_found(h)
        version, files = entry
        if method == "GetModelInstance":
            out = json.dumps({"versionNumber": version, "slug": body.get("instanceSlug")}).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(out)))
            h.end_headers()
            h.wfile.write(out)
        elif method == "DownloadModelInstanceVersion" and body.get("path") in files:
            h.send_response(302)
            h.send_header("Location", f"{self.url}/kaggle-blobs/{handle}/{version}/{body['path']}")
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            self._not_found(h)
