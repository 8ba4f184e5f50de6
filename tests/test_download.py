"""download.sh against the fake Meta bucket of tests/download_fixtures.py: subsets, prompts,
flags and environment, resuming, retries, corrupted and refused files, with curl and wget."""

import os
import socket
import subprocess

import pytest

from tests.download_fixtures import (  # noqa: F401 (fixtures)
    DOWNLOAD_SH,
    KEY_PAIR_ID,
    MODELS,
    POLICY,
    SHARD_SIZE,
    SIGNATURE,
    assert_model,
    assert_tokenizer,
    bucket,
    describe,
    downloader,
    md5_hex,
    no_part_files,
    presigned_url,
    run_download,
    server,
)


def test_help_and_bash32_hygiene():
    result = subprocess.run(["bash", str(DOWNLOAD_SH), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "Usage: download.sh" in result.stdout
    assert os.access(DOWNLOAD_SH, os.X_OK), "download.sh must be executable"
    code = "\n".join(
        line for line in DOWNLOAD_SH.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    for construct in ("declare -A", "local -A", ",,}", "^^}", "mapfile", "readarray", "seq -f",
                      "md5sum"):
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
    assert "expected md5 %s" % md5_hex(bucket.files[shard]) in result.stderr
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
    bucket.files[chk_path] = saved + ("%s  extra.bin\n%s  ../escape.bin\n%s  two words.bin\n" % (md5_hex(extra), md5_hex(extra), md5_hex(extra))).encode()
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
