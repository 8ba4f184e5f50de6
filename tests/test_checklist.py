"""llama/checkpoints/checklist.py (loaded by path: no torch): md5 in chunks, parsing checklists
as md5sum writes them and as people edit them, verifying, and its command line."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.download_fixtures import (
    CHECKLIST_PY,
    ROOT,
    checklist,
    md5_hex,
)


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
    assert checklist.md5_file(path) == md5_hex(data)
    assert checklist.md5_file(str(path), chunk_size=7) == md5_hex(data)


def test_parse_crlf_binary_marker_blank_lines_and_bom(tmp_path):
    md5_a, md5_b = md5_hex(b"alpha"), md5_hex(b"{}").upper()
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
    chk = write(folder / "checklist.chk",
                "%s  a.bin\n%s  b.json\n" % (md5_hex(b"alpha"), md5_hex(b"{}")))
    assert checklist.verify_checklist(chk) == ["a.bin", "b.json"]
    assert checklist.verify_checklist(str(chk), only={"b.json"}) == ["b.json"]
    # Names resolve against `directory` when given.
    other = folder / "elsewhere"
    other.mkdir()
    chk2 = write(other / "list.chk", "%s  a.bin\n" % md5_hex(b"alpha"))
    assert checklist.verify_checklist(chk2, directory=folder) == ["a.bin"]
    with pytest.raises(checklist.ChecklistError, match="a.bin: missing"):
        checklist.verify_checklist(chk2)


def test_verify_lists_all_problems_at_once(folder):
    chk = write(
        folder / "checklist.chk",
        "%s  a.bin\n%s  b.json\n%s  consolidated.00.pth\n%s  consolidated.01.pth\n"
        % (md5_hex(b"alpha"), "f" * 32, "0" * 32, "1" * 32),
    )
    with pytest.raises(checklist.ChecklistError) as info:
        checklist.verify_checklist(chk)
    err = info.value
    message = str(err)
    assert isinstance(err, ValueError)
    assert "3 files failed verification" in message
    assert ("b.json: checksum mismatch (expected md5 %s, got %s)" % ("f" * 32, md5_hex(b"{}"))
            in message)
    assert "consolidated.00.pth: missing" in message
    assert "consolidated.01.pth: missing" in message
    assert "Re-download the file(s) named above" in message and "request a new link" in message
    assert err.missing == ["consolidated.00.pth", "consolidated.01.pth"]
    assert err.mismatched == ["b.json"]
    assert err.verified == ["a.bin"]


def test_verify_only_name_not_listed(folder):
    chk = write(folder / "checklist.chk", "%s  a.bin\n" % md5_hex(b"alpha"))
    with pytest.raises(checklist.ChecklistError, match="params.json: not listed"):
        checklist.verify_checklist(chk, only=["params.json"])


def test_verify_file_checks_a_part_download(folder):
    chk = write(folder / "checklist.chk", "%s  a.bin\n" % md5_hex(b"alpha"))
    part = write(folder / "a.bin.part", b"alpha")
    assert checklist.verify_file(chk, "a.bin", part) == "a.bin"
    write(part, b"alpha!")
    with pytest.raises(checklist.ChecklistError, match="a.bin: checksum mismatch"):
        checklist.verify_file(chk, "a.bin", part)


def run_cli(*args):
    command = [sys.executable, str(CHECKLIST_PY)]
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True,
                          cwd=str(ROOT))


def test_cli(folder):
    chk = write(folder / "checklist.chk",
                "%s  a.bin\r\n%s *b.json\r\n" % (md5_hex(b"alpha"), md5_hex(b"{}")))
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
    chk = write(folder / "checklist.chk", "%s  a.bin\n" % md5_hex(b"alpha"))
    result = subprocess.run(
        [sys.executable, "-m", "llama.checklist", str(chk)],
        capture_output=True,
        text=True,
        cwd=str(package.parent),
    )
    assert (result.returncode, result.stdout) == (0, "a.bin: OK\n")
