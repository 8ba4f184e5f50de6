"""Tests for download.sh and llama/checkpoints/checklist.py.

download.sh runs against a fake Meta bucket served from 127.0.0.1: a threaded
HTTP server that checks the presigned query string (403 otherwise), honours
Range requests (206/416) and can be told to cut a transfer off halfway, serve
a corrupted file, serve a web page instead of a file, fail once with 503 or
ignore Range headers. No torch is needed.
"""

import hashlib
import importlib.util
import os
import random
import shutil
import socket
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


def _md5(data):
    return hashlib.md5(data).hexdigest()


def make_bucket_files():
    rng = random.Random(1234)
    files = {
        "LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT (fake, for tests)\n",
        "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy (fake, for tests)\n",
        "tokenizer.model": bytes(rng.getrandbits(8) for _ in range(3000)),
    }
    files["tokenizer_checklist.chk"] = (
        "%s  tokenizer.model\n" % _md5(files["tokenizer.model"])
    ).encode()
    for folder, shards in MODELS.items():
        lines = []
        for i in range(shards):
            name = "consolidated.%02d.pth" % i
            data = bytes(rng.getrandbits(8) for _ in range(SHARD_SIZE + i))
            files["%s/%s" % (folder, name)] = data
            lines.append("%s  %s\n" % (_md5(data), name))
        params = b'{"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}'
        files["%s/params.json" % folder] = params
        lines.append("%s  params.json\n" % _md5(params))
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

    def _send(self, status, body, content_type, extra=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

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
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
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


# ---------------------------------------------------------------- download.sh


def test_help_and_bash32_hygiene():
    result = subprocess.run(["bash", str(DOWNLOAD_SH), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "Usage: download.sh" in result.stdout
    assert os.access(DOWNLOAD_SH, os.X_OK), "download.sh must be executable"
    code = "\n".join(
        line for line in DOWNLOAD_SH.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    for construct in ("declare -A", "local -A", ",,}", "^^}", "mapfile", "readarray", "seq -f", "md5sum"):
        assert construct not in code, construct


def test_download_subset(server, bucket, tmp_path, downloader):
    result = run_download(
        tmp_path,
        {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "7B,13B"},
        downloader=downloader,
    )
    assert result.returncode == 0, describe(result)
    assert_tokenizer(tmp_path, bucket)
    assert_model(tmp_path, bucket, "llama-2-7b")
    assert_model(tmp_path, bucket, "llama-2-13b")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["llama-2-13b", "llama-2-7b"]
    assert no_part_files(tmp_path)
    assert "llama-2-13b/consolidated.01.pth: OK" in result.stdout
    # Every request used the presigned query, with '*' replaced by the path.
    assert "*" not in "".join(bucket.paths())
    assert "llama-2-13b/consolidated.01.pth" in bucket.paths()


def test_prompts_enter_for_all(server, bucket, tmp_path):
    result = run_download(tmp_path, stdin_text=presigned_url(server) + "\n\n")
    assert result.returncode == 0, describe(result)
    assert_tokenizer(tmp_path, bucket)
    for folder in MODELS:
        assert_model(tmp_path, bucket, folder)
    assert no_part_files(tmp_path)


def test_prompts_with_crlf_and_messy_names(server, bucket, tmp_path):
    answers = presigned_url(server) + "\r\n 7b-CHAT ,7B-chat\r\n"
    result = run_download(tmp_path, stdin_text=answers)
    assert result.returncode == 0, describe(result)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["llama-2-7b-chat"]
    assert_model(tmp_path, bucket, "llama-2-7b-chat")


def test_flags_win_over_environment(server, bucket, tmp_path):
    env = {
        "PRESIGNED_URL": presigned_url(server, signature="stale"),
        "MODEL_SIZE": "8B",
        "TARGET_FOLDER": str(tmp_path / "not-here"),
    }
    args = ["--url", presigned_url(server), "--models=7B-chat", "--target", str(tmp_path / "weights")]
    result = run_download(tmp_path, env, args)
    assert result.returncode == 0, describe(result)
    assert_model(tmp_path / "weights", bucket, "llama-2-7b-chat")
    assert not (tmp_path / "not-here").exists()


def test_target_folder_from_environment(server, bucket, tmp_path):
    env = {
        "PRESIGNED_URL": presigned_url(server),
        "MODEL_SIZE": "7B",
        "TARGET_FOLDER": str(tmp_path / "deep" / "folder"),
    }
    result = run_download(tmp_path, env)
    assert result.returncode == 0, describe(result)
    assert_tokenizer(tmp_path / "deep" / "folder", bucket)
    assert_model(tmp_path / "deep" / "folder", bucket, "llama-2-7b")


def test_unknown_model_rejected_before_any_request(server, bucket, tmp_path):
    result = run_download(tmp_path, {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "7B,8B,13b-instruct"})
    assert result.returncode == 2, describe(result)
    assert "'8B'" in result.stderr and "'13b-instruct'" in result.stderr
    assert "7B,13B,70B,7B-chat,13B-chat,70B-chat" in result.stderr
    assert bucket.requests == []
    assert list(tmp_path.iterdir()) == []

    # The same through the prompt, when stdin is not a terminal: no loop, no hang.
    result = run_download(tmp_path, stdin_text=presigned_url(server) + "\n7B,foo\n")
    assert result.returncode == 2, describe(result)
    assert "'foo'" in result.stderr
    assert bucket.requests == []


def test_no_url_without_terminal_fails_fast(bucket, tmp_path):
    result = run_download(tmp_path, timeout=15)
    assert result.returncode == 2, describe(result)
    assert "no download URL given" in result.stderr
    assert "PRESIGNED_URL" in result.stderr and "--url" in result.stderr
    assert bucket.requests == []


@pytest.mark.parametrize(
    "url, message",
    [
        ("127.0.0.1/*?Policy=x", "should start with https://"),
        ("https://download.llamameta.net/llama-2-7b?Policy=x&Signature=y", "has no '*'"),
    ],
)
def test_malformed_url_rejected(bucket, tmp_path, url, message):
    result = run_download(tmp_path, {"PRESIGNED_URL": url, "MODEL_SIZE": "7B"})
    assert result.returncode == 2, describe(result)
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_resume_within_one_run(server, bucket, tmp_path, downloader):
    shard = "llama-2-7b/consolidated.00.pth"
    bucket.cut_once.add(shard)
    result = run_download(
        tmp_path,
        {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "7B", "DOWNLOAD_RETRIES": "2"},
        downloader=downloader,
    )
    assert result.returncode == 0, describe(result)
    assert bucket.ranges_for(shard) == ["bytes=%d-" % (SHARD_SIZE // 2)]
    assert "retrying" in result.stdout
    assert_model(tmp_path, bucket, "llama-2-7b")
    assert no_part_files(tmp_path)


def test_resume_in_a_second_run(server, bucket, tmp_path, downloader):
    shard = "llama-2-13b/consolidated.01.pth"
    size = len(bucket.files[shard])
    bucket.cut_once.add(shard)
    env = {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "13B", "DOWNLOAD_RETRIES": "0"}
    result = run_download(tmp_path, env, downloader=downloader)
    assert result.returncode == 4, describe(result)
    assert "network failure while downloading %s" % shard in result.stderr
    assert "cut off" in result.stderr and "resumes" in result.stderr
    # The half-downloaded shard is kept as .part, never under its final name.
    assert not (tmp_path / shard).exists()
    assert (tmp_path / (shard + ".part")).stat().st_size == size // 2

    bucket.requests.clear()
    result = run_download(tmp_path, env, downloader=downloader)
    assert result.returncode == 0, describe(result)
    assert "Resuming %s (%d bytes already downloaded)" % (shard, size // 2) in result.stdout
    assert bucket.ranges_for(shard) == ["bytes=%d-" % (size // 2)]
    assert "Skipping llama-2-13b/consolidated.00.pth: already downloaded and verified" in result.stdout
    assert_model(tmp_path, bucket, "llama-2-13b")
    assert no_part_files(tmp_path)


def test_server_without_range_support_restarts_the_file(server, bucket, tmp_path, downloader):
    shard = "llama-2-7b/consolidated.00.pth"
    (tmp_path / "llama-2-7b").mkdir()
    # A genuine partial download: the start of the file.
    (tmp_path / (shard + ".part")).write_bytes(bucket.files[shard][:100])
    bucket.no_range = True
    result = run_download(
        tmp_path, {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "7B"}, downloader=downloader
    )
    assert result.returncode == 0, describe(result)
    assert_model(tmp_path, bucket, "llama-2-7b")


def test_complete_part_file_is_verified_and_renamed(server, bucket, tmp_path, downloader):
    # Killed after the transfer but before the rename: the server answers 416.
    shard = "llama-2-7b/consolidated.00.pth"
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / (shard + ".part")).write_bytes(bucket.files[shard])
    result = run_download(
        tmp_path, {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "7B"}, downloader=downloader
    )
    assert result.returncode == 0, describe(result)
    assert_model(tmp_path, bucket, "llama-2-7b")


def test_transient_server_error_is_retried(server, bucket, tmp_path):
    bucket.fail_once["tokenizer.model"] = 503
    result = run_download(tmp_path, {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "7B"})
    assert result.returncode == 0, describe(result)
    assert "HTTP 503; retrying" in result.stdout
    assert_tokenizer(tmp_path, bucket)


def test_corrupted_file_detected(server, bucket, tmp_path, downloader):
    shard = "llama-2-7b/consolidated.00.pth"
    bucket.corrupt.add(shard)
    env = {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "7B"}
    result = run_download(tmp_path, env, downloader=downloader)
    assert result.returncode == 5, describe(result)
    assert "checksum mismatch for %s" % shard in result.stderr
    assert "expected md5 %s" % _md5(bucket.files[shard]) in result.stderr
    assert not (tmp_path / shard).exists()
    assert not (tmp_path / (shard + ".part")).exists()
    # The other files were still fetched and verified.
    assert (tmp_path / "llama-2-7b" / "params.json").exists()

    # Once the server is fixed, a re-run fetches only the bad shard.
    bucket.reset()
    result = run_download(tmp_path, env, downloader=downloader)
    assert result.returncode == 0, describe(result)
    assert bucket.paths() == [shard]
    assert_model(tmp_path, bucket, "llama-2-7b")


def test_rerun_skips_verified_files_and_replaces_damaged_ones(server, bucket, tmp_path):
    downloader = None  # the skipping logic does not depend on the downloader
    env = {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "7B,13B-chat"}
    assert run_download(tmp_path, env, downloader=downloader).returncode == 0
    bucket.requests.clear()
    result = run_download(tmp_path, env, downloader=downloader)
    assert result.returncode == 0, describe(result)
    assert bucket.requests == []
    assert "Skipping tokenizer.model: already downloaded and verified" in result.stdout
    assert "Skipping llama-2-13b-chat/consolidated.01.pth: already downloaded and verified" in result.stdout
    assert "Skipping LICENSE: already downloaded" in result.stdout

    # A final file damaged on disk is noticed and downloaded again.
    shard = tmp_path / "llama-2-13b-chat" / "consolidated.00.pth"
    shard.write_bytes(b"x" * 10)
    result = run_download(tmp_path, env, downloader=downloader)
    assert result.returncode == 0, describe(result)
    assert "does not match its checksum" in result.stdout
    assert bucket.paths() == ["llama-2-13b-chat/consolidated.00.pth"]
    assert_model(tmp_path, bucket, "llama-2-13b-chat")


@pytest.mark.parametrize("how", ["bad-signature", "expired"])
def test_refused_link_explained(server, bucket, tmp_path, downloader, how):
    if how == "expired":
        bucket.expired = True
        url = presigned_url(server)
    else:
        url = presigned_url(server, signature="not-the-signature")
    result = run_download(tmp_path, {"PRESIGNED_URL": url, "MODEL_SIZE": "7B"}, downloader=downloader)
    assert result.returncode == 3, describe(result)
    assert "the download link was refused (HTTP 403)" in result.stderr
    assert "expire after 24 hours" in result.stderr
    assert "request a new link" in result.stderr
    assert len(bucket.requests) == 1  # no pointless retries
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "path, content_type",
    [("tokenizer.model", "text/html; charset=utf-8"), ("llama-2-7b/consolidated.00.pth", "binary/octet-stream")],
)
def test_html_page_instead_of_binary(server, bucket, tmp_path, downloader, path, content_type):
    bucket.html[path] = content_type
    result = run_download(
        tmp_path, {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "7B"}, downloader=downloader
    )
    assert result.returncode == 6, describe(result)
    assert "instead of %s the server sent a web page (HTML" % path in result.stderr
    assert "Sign in to continue" in result.stderr
    assert not (tmp_path / path).exists()
    assert no_part_files(tmp_path)


def test_network_failure_explained(bucket, tmp_path, downloader):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = "http://127.0.0.1:%d/*?Policy=%s&Signature=%s&Key-Pair-Id=%s" % (port, POLICY, SIGNATURE, KEY_PAIR_ID)
    result = run_download(tmp_path, {"PRESIGNED_URL": url, "MODEL_SIZE": "7B"}, downloader=downloader)
    assert result.returncode == 4, describe(result)
    assert "network failure while downloading LICENSE" in result.stderr
    assert "connection refused" in result.stderr
    assert "running download.sh again resumes" in result.stderr
    assert "after 2 tries" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_file_on_server(server, bucket, tmp_path):
    del_path = "llama-2-7b/params.json"
    saved = bucket.files.pop(del_path)
    try:
        result = run_download(tmp_path, {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "7B"})
    finally:
        bucket.files[del_path] = saved
    assert result.returncode == 1, describe(result)
    assert "the server has no %s (HTTP 404)" % del_path in result.stderr


def test_extra_files_in_checklist_are_fetched_too(server, bucket, tmp_path):
    chk_path = "llama-2-7b/checklist.chk"
    saved = bucket.files[chk_path]
    extra = b"an extra file Meta might add one day"
    bucket.files["llama-2-7b/extra.bin"] = extra
    bucket.files[chk_path] = saved + ("%s  extra.bin\n%s  ../escape.bin\n%s  two words.bin\n" % (_md5(extra), _md5(extra), _md5(extra))).encode()
    try:
        result = run_download(tmp_path, {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "7B"})
    finally:
        bucket.files[chk_path] = saved
        del bucket.files["llama-2-7b/extra.bin"]
    assert result.returncode == 0, describe(result)
    assert (tmp_path / "llama-2-7b" / "extra.bin").read_bytes() == extra
    assert "llama-2-7b/extra.bin: OK" in result.stdout
    assert "ignoring '../escape.bin'" in result.stderr
    assert "ignoring 'two words.bin'" in result.stderr
    assert not (tmp_path / "escape.bin").exists()


def test_unknown_downloader_rejected(bucket, tmp_path, server):
    result = run_download(
        tmp_path, {"PRESIGNED_URL": presigned_url(server), "MODEL_SIZE": "7B", "DOWNLOADER": "aria2c"}
    )
    assert result.returncode == 2, describe(result)
    assert "DOWNLOADER must be 'curl' or 'wget'" in result.stderr
    assert bucket.requests == []


# ---------------------------------------------------------------- llama/checkpoints/checklist.py


def write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.fixture
def folder(tmp_path):
    write(tmp_path / "a.bin", b"alpha")
    write(tmp_path / "b.json", b"{}")
    return tmp_path


def test_md5_file_streams_in_chunks(tmp_path):
    data = os.urandom(100_000)
    path = write(tmp_path / "blob", data)
    assert checklist.md5_file(path) == _md5(data)
    assert checklist.md5_file(str(path), chunk_size=7) == _md5(data)


def test_parse_crlf_binary_marker_blank_lines_and_bom(tmp_path):
    md5_a, md5_b = _md5(b"alpha"), _md5(b"{}").upper()
    path = write(
        tmp_path / "c.chk",
        "\ufeff%s  a.bin\r\n\r\n%s *b.json\r\n   \nMD5 (c d.txt) = %s\n" % (md5_a, md5_b, md5_a),
    )
    assert checklist.parse_checklist(path) == [
        (md5_a, "a.bin"),
        (md5_b.lower(), "b.json"),
        (md5_a, "c d.txt"),
    ]


@pytest.mark.parametrize(
    "text, line",
    [
        ("nonsense\n", 1),
        ("%s  a.bin\n\n<html>\n" % ("0" * 32), 3),
        ("%s\n" % ("0" * 32), 1),
        ("%s  a.bin\n" % ("0" * 31), 1),
    ],
)
def test_parse_malformed_line_names_line_number(tmp_path, text, line):
    path = write(tmp_path / "bad.chk", text)
    with pytest.raises(checklist.ChecklistError, match=r"line %d\b" % line):
        checklist.parse_checklist(path)


def test_parse_empty_or_missing_checklist(tmp_path):
    with pytest.raises(checklist.ChecklistError, match="lists no files"):
        checklist.parse_checklist(write(tmp_path / "empty.chk", "\r\n\n"))
    with pytest.raises(checklist.ChecklistError, match="not found"):
        checklist.parse_checklist(tmp_path / "nope.chk")


def test_verify_ok_and_only(folder):
    chk = write(folder / "checklist.chk", "%s  a.bin\n%s  b.json\n" % (_md5(b"alpha"), _md5(b"{}")))
    assert checklist.verify_checklist(chk) == ["a.bin", "b.json"]
    assert checklist.verify_checklist(str(chk), only={"b.json"}) == ["b.json"]
    # Names resolve against `directory` when given.
    other = folder / "elsewhere"
    other.mkdir()
    chk2 = write(other / "list.chk", "%s  a.bin\n" % _md5(b"alpha"))
    assert checklist.verify_checklist(chk2, directory=folder) == ["a.bin"]
    with pytest.raises(checklist.ChecklistError, match="a.bin: missing"):
        checklist.verify_checklist(chk2)


def test_verify_lists_all_problems_at_once(folder):
    chk = write(
        folder / "checklist.chk",
        "%s  a.bin\n%s  b.json\n%s  consolidated.00.pth\n%s  consolidated.01.pth\n"
        % (_md5(b"alpha"), "f" * 32, "0" * 32, "1" * 32),
    )
    with pytest.raises(checklist.ChecklistError) as info:
        checklist.verify_checklist(chk)
    err = info.value
    message = str(err)
    assert isinstance(err, ValueError)
    assert "3 files failed verification" in message
    assert "b.json: checksum mismatch (expected md5 %s, got %s)" % ("f" * 32, _md5(b"{}")) in message
    assert "consolidated.00.pth: missing" in message
    assert "consolidated.01.pth: missing" in message
    assert "Re-download the file(s) named above" in message and "request a new link" in message
    assert err.missing == ["consolidated.00.pth", "consolidated.01.pth"]
    assert err.mismatched == ["b.json"]
    assert err.verified == ["a.bin"]


def test_verify_only_name_not_listed(folder):
    chk = write(folder / "checklist.chk", "%s  a.bin\n" % _md5(b"alpha"))
    with pytest.raises(checklist.ChecklistError, match="params.json: not listed"):
        checklist.verify_checklist(chk, only=["params.json"])


def test_verify_file_checks_a_part_download(folder):
    chk = write(folder / "checklist.chk", "%s  a.bin\n" % _md5(b"alpha"))
    part = write(folder / "a.bin.part", b"alpha")
    assert checklist.verify_file(chk, "a.bin", part) == "a.bin"
    write(part, b"alpha!")
    with pytest.raises(checklist.ChecklistError, match="a.bin: checksum mismatch"):
        checklist.verify_file(chk, "a.bin", part)


def run_cli(*args):
    command = [sys.executable, str(CHECKLIST_PY)]
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, cwd=str(ROOT))


def test_cli(folder):
    chk = write(folder / "checklist.chk", "%s  a.bin\r\n%s *b.json\r\n" % (_md5(b"alpha"), _md5(b"{}")))
    result = run_cli(chk)
    assert (result.returncode, result.stdout, result.stderr) == (0, "a.bin: OK\nb.json: OK\n", "")
    result = run_cli(chk, "--only", "b.json")
    assert (result.returncode, result.stdout) == (0, "b.json: OK\n")
    assert run_cli(chk, "--list").stdout == "a.bin\nb.json\n"

    write(folder / "b.json", b"[]")
    (folder / "a.bin").rename(folder / "a.bin.old")
    result = run_cli(chk, "--dir", folder)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "a.bin: missing" in result.stderr and "b.json: checksum mismatch" in result.stderr

    result = run_cli(chk, "--only", "a.bin", "--file", folder / "a.bin.old")
    assert (result.returncode, result.stdout) == (0, "a.bin: OK\n")


def test_cli_as_module(folder, tmp_path):
    # `python -m llama.checklist` must work without importing anything else of
    # the package: run it from a copy holding only llama/checkpoints/checklist.py.
    package = tmp_path / "pkg" / "llama"
    package.mkdir(parents=True)
    shutil.copy(CHECKLIST_PY, package / "checklist.py")
    chk = write(folder / "checklist.chk", "%s  a.bin\n" % _md5(b"alpha"))
    result = subprocess.run(
        [sys.executable, "-m", "llama.checklist", str(chk)],
        capture_output=True,
        text=True,
        cwd=str(package.parent),
    )
    assert (result.returncode, result.stdout) == (0, "a.bin: OK\n")
