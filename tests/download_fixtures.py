"""download.sh's test bench: a fake Meta bucket served from 127.0.0.1 (a threaded HTTP server
that checks the presigned query string (403 otherwise), honours Range requests (206/416) and can
be told to cut a transfer off halfway, serve a corrupted file, serve a web page instead of a
file, fail once with 503 or ignore Range headers), the script run as a user would, and
llama/checkpoints/checklist.py loaded by path. No torch is needed."""

import hashlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOWNLOAD_SH = ROOT / "download.sh"
CHECKLIST_PY = ROOT / "llama" / "checkpoints" / "checklist.py"

# Load llama/checkpoints/checklist.py by path so that these tests never import the llama
# package (whose __init__ may need torch).
_spec = importlib.util.spec_from_file_location("_checklist_under_test", CHECKLIST_PY)
checklist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checklist)

# ---------------------------------------------------------------- fake bucket

POLICY = "eyJTdGF0ZW1lbnQiOlt7InVuaXF1ZV9oYXNoIjoiZmFrZSJ9XX0_"
SIGNATURE = "Zm9v~YmFy-YmF6_cXV4"
KEY_PAIR_ID = "K15QRJLYKIFSLZ"

MODELS = {  # folder: number of shards
    "llama-2-7b": 1,
    "llama-2-7b-chat": 1,
    "llama-2-13b": 2,
    "llama-2-13b-chat": 2,
    "llama-2-70b": 8,
    "llama-2-70b-chat": 8,
}
SHARD_SIZE = 4096
HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Sign in to continue</title></head>"
    b"<body><p>Please log in.</p></body></html>\n"
)


def md5_hex(data):
    return hashlib.md5(data).hexdigest()


def make_bucket_files():
    rng = random.Random(1234)
    files = {
        "LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT (fake, for tests)\n",
        "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy (fake, for tests)\n",
        "tokenizer.model": bytes(rng.getrandbits(8) for _ in range(3000)),
    }
    files["tokenizer_checklist.chk"] = (
        "%s  tokenizer.model\n" % md5_hex(files["tokenizer.model"])
    ).encode()
    for folder, shards in MODELS.items():
        lines = []
        for i in range(shards):
            name = "consolidated.%02d.pth" % i
            data = bytes(rng.getrandbits(8) for _ in range(SHARD_SIZE + i))
            files["%s/%s" % (folder, name)] = data
            lines.append("%s  %s\n" % (md5_hex(data), name))
        params = (b'{"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, '
                  b'"norm_eps": 1e-05, "vocab_size": -1}')
        files["%s/params.json" % folder] = params
        lines.append("%s  params.json\n" % md5_hex(params))
        files["%s/checklist.chk" % folder] = "".join(lines).encode()
    return files


class Bucket:
    def __init__(self, files):
        self.files = files
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.requests = []  # (file path, Range header or None)
        self.expired = False
        self.cut_once = set()  # paths whose next transfer stops halfway
        self.corrupt = set()  # paths served with flipped bytes
        self.html = {}  # path -> Content-Type of a web page served instead
        self.fail_once = {}  # path -> status answered once (e.g. 503)
        self.no_range = False  # ignore Range headers (always 200)

    def ranges_for(self, path):
        return [r for p, r in self.requests if p == path and r]

    def paths(self):
        return [p for p, _ in self.requests]


class BucketHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status, body, content_type, extra=(), delivered=None):
        """Headers for `body`, then `delivered` bytes of it (all unless given)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body if delivered is None else body[:delivered])

    def _xml_error(self, status, code):
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code>'
            "<Message>%s</Message></Error>" % (code, code)
        ).encode()
        self._send(status, body, "text/xml")

    def do_GET(self):
        bucket = self.server.bucket
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path).lstrip("/")
        query = urllib.parse.parse_qs(url.query)
        range_header = self.headers.get("Range")
        with bucket.lock:
            bucket.requests.append((path, range_header))
            signed = (
                query.get("Policy") == [POLICY]
                and query.get("Signature") == [SIGNATURE]
                and query.get("Key-Pair-Id") == [KEY_PAIR_ID]
            )
            if bucket.expired or not signed:
                return self._xml_error(403, "AccessDenied")
            if path in bucket.fail_once:
                status = bucket.fail_once.pop(path)
                return self._xml_error(status, "ServiceUnavailable")
            if path in bucket.html:
                return self._send(200, HTML_PAGE, bucket.html[path])
            if path not in bucket.files:
                return self._xml_error(404, "NoSuchKey")
            data = bucket.files[path]
            if path in bucket.corrupt:
                data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
            cut = path in bucket.cut_once
            bucket.cut_once.discard(path)

        start, end, status, extra = 0, len(data) - 1, 200, []
        if range_header and not bucket.no_range:
            spec = range_header.split("=", 1)[1].split(",")[0].strip()
            first, _, last = spec.partition("-")
            start = int(first)
            if last:
                end = min(int(last), end)
            if start >= len(data):
                return self._send(
                    416, b"", "text/xml", [("Content-Range", "bytes */%d" % len(data))]
                )
            status = 206
            extra.append(("Content-Range", "bytes %d-%d/%d" % (start, end, len(data))))
        body = data[start : end + 1]
        content_type = "text/plain" if path.endswith(("LICENSE", ".md")) else "binary/octet-stream"
        if not cut:
            return self._send(status, body, content_type, extra)
        # Promise the whole body, deliver half of it, hang up.
        self._send(status, body, content_type, extra, delivered=len(body) // 2)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BucketHandler)
    httpd.daemon_threads = True
    httpd.bucket = Bucket(make_bucket_files())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def bucket(server):
    server.bucket.reset()
    return server.bucket


def presigned_url(server, signature=SIGNATURE):
    host, port = server.server_address[:2]
    return "http://%s:%d/*?Policy=%s&Signature=%s&Key-Pair-Id=%s" % (
        host,
        port,
        POLICY,
        signature,
        KEY_PAIR_ID,
    )


DOWNLOADERS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(shutil.which(name) is None, reason="%s is not installed" % name),
    )
    for name in ("curl", "wget")
]


@pytest.fixture(params=DOWNLOADERS)
def downloader(request):
    return request.param


def run_download(cwd, env=None, args=(), stdin_text=None, downloader=None, timeout=60):
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER", "DOWNLOADER")
        and not k.startswith("DOWNLOAD_")
        and not k.lower().endswith("_proxy")
    }
    full_env.update(DOWNLOAD_RETRIES="1", DOWNLOAD_RETRY_DELAY="0", DOWNLOAD_TIMEOUT="10")
    full_env["PYTHON"] = sys.executable  # skip wrappers such as pyenv shims: faster
    if downloader:
        full_env["DOWNLOADER"] = downloader
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(DOWNLOAD_SH)] + list(args),
        cwd=str(cwd),
        env=full_env,
        input=stdin_text,
        stdin=subprocess.DEVNULL if stdin_text is None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_model(target, bucket, folder):
    for i in range(MODELS[folder]):
        rel = "%s/consolidated.%02d.pth" % (folder, i)
        assert (target / rel).read_bytes() == bucket.files[rel], rel
    for name in ("params.json", "checklist.chk"):
        rel = "%s/%s" % (folder, name)
        assert (target / rel).read_bytes() == bucket.files[rel], rel
    # Everything in the folder verifies with the checklist, and nothing is left over.
    assert checklist.verify_checklist(target / folder / "checklist.chk")
    assert sorted(p.name for p in (target / folder).iterdir()) == sorted(
        ["checklist.chk", "params.json"]
        + ["consolidated.%02d.pth" % i for i in range(MODELS[folder])]
    )


def assert_tokenizer(target, bucket):
    for rel in ("LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk"):
        assert (target / rel).read_bytes() == bucket.files[rel], rel


def no_part_files(target):
    return not list(Path(target).rglob("*.part"))


def describe(result):
    return "exit %s\n--- stdout\n%s\n--- stderr\n%s" % (
        result.returncode,
        result.stdout,
        result.stderr,
    )
