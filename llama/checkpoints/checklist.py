#!/usr/bin/env python3
"""Verify downloaded files against an md5 checklist (``checklist.chk``).

Meta ships every model folder with a ``checklist.chk`` and the tokenizer with a
``tokenizer_checklist.chk``, both in the format ``md5sum`` writes::

    <32 hex digits>  <file name>

This module checks such a list with nothing but the Python standard library, so
the same code runs on Linux, macOS and Windows (no ``md5sum`` vs ``md5``
differences), from ``download.sh`` and from the model loader.

Use it as a library::

    from llama.checkpoints.checklist import verify_checklist, ChecklistError
    verify_checklist("llama-2-7b/checklist.chk")

or from the command line (it imports nothing from the ``llama`` package, so it
also runs as a plain script)::

    python3 llama/checkpoints/checklist.py llama-2-7b/checklist.chk
    python3 llama/checkpoints/checklist.py checklist.chk --dir llama-2-7b --only params.json
    python -m llama.checklist llama-2-7b/checklist.chk
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

__all__ = [
    "ChecklistError",
    "md5_file",
    "parse_checklist",
    "verify_checklist",
    "verify_file",
]

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024  # 8 MiB

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")

_REDOWNLOAD_HINT = (
    "Re-download the file(s) named above: run download.sh again, it replaces "
    "damaged files and fetches only what is missing or damaged. If the "
    "download link is refused, it has expired: request a new link."
)


class ChecklistError(ValueError):
    """A checklist could not be read, or files do not match it.

    ``problems`` holds one human-readable line per problem; ``missing`` and
    ``mismatched`` hold the names of the files concerned and ``verified`` the
    names that did check out.
    """

    def __init__(self, message, problems=None, missing=None, mismatched=None, verified=None):
        super().__init__(message)
        self.problems = list(problems or [])
        self.missing = list(missing or [])
        self.mismatched = list(mismatched or [])
        self.verified = list(verified or [])


def _new_md5():
    try:
        return hashlib.md5(usedforsecurity=False)  # FIPS-enabled systems
    except TypeError:  # Python < 3.9
        return hashlib.md5()


def md5_file(path, chunk_size=DEFAULT_CHUNK_SIZE) -> str:
    """Return the md5 hex digest of the file at ``path``, read in chunks."""
    digest = _new_md5()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def _unescape_md5sum_name(name: str) -> str:
    # md5sum prefixes a line with "\" when the name holds "\" or a newline and
    # writes them as "\\" and "\n".
    out = []
    i = 0
    while i < len(name):
        c = name[i]
        if c == "\\" and i + 1 < len(name):
            nxt = name[i + 1]
            out.append("\n" if nxt == "n" else "\r" if nxt == "r" else nxt)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _is_md5(text):
    return len(text) == 32 and all(c in _HEX_DIGITS for c in text)


def _parse_line(line):
    """Return (md5, name) for one checklist line, or None if it is not one.

    Knows "<md5>  <name>" (md5sum, text mode), "<md5> *<name>" (binary mode),
    "<md5> <name>" (BSD ``md5 -r``) and "MD5 (<name>) = <md5>" (BSD ``md5``,
    ``md5sum --tag``).
    """
    if len(line) > 33 and line[32] == " " and _is_md5(line[:32]):
        name = line[33:]
        if name[:1] in (" ", "*"):
            name = name[1:]
        return (line[:32], name) if name.strip() else None
    if line.startswith("MD5"):
        head, equals, md5 = line.rpartition("=")
        body = head[3:].strip()
        md5 = md5.strip()
        if equals and _is_md5(md5) and len(body) > 2 and body[0] == "(" and body[-1] == ")":
            name = body[1:-1]
            return (md5, name) if name.strip() else None
    return None


def parse_checklist(path) -> list[tuple[str, str]]:
    """Read an md5 checklist and return ``[(md5, relative name), ...]``.

    Accepts md5sum's text (``"<md5>  name"``) and binary (``"<md5> *name"``)
    lines, BSD ``MD5 (name) = <md5>`` lines, CRLF line endings, a UTF-8 byte
    order mark and blank lines. The md5 is returned in lower case. Raises
    ``ChecklistError`` naming the line of the first malformed line, or when the
    file cannot be read or lists no file at all.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ChecklistError(
            "checklist %s not found: download it again" % path,
            problems=["%s: missing" % path],
            missing=[os.path.basename(str(path))],
        ) from None
    except OSError as e:
        raise ChecklistError("cannot read checklist %s: %s" % (path, e)) from None

    text = raw.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]

    entries = []
    # Split on "\n" only: a name may in theory hold other line separators.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r").strip()
        if not line:
            continue
        escaped = line.startswith("\\")
        if escaped:
            line = line[1:]
        entry = _parse_line(line)
        if entry is None:
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise ChecklistError(
                "%s line %d is not a checklist line (expected '<md5>  <file "
                "name>'): %r. The checklist is damaged or is not a checklist "
                "(an error page?): download it again." % (path, lineno, shown)
            )
        md5, name = entry
        if escaped:
            name = _unescape_md5sum_name(name)
        entries.append((md5.lower(), name))

    if not entries:
        raise ChecklistError(
            "checklist %s lists no files: it is empty or truncated, download "
            "it again." % path
        )
    return entries


def _check_one(expected, name, path, problems, missing, mismatched):
    """Compare ``path`` with ``expected``; record a problem and return False."""
    if not os.path.isfile(path):
        problems.append("%s: missing (looked for %s)" % (name, path))
        missing.append(name)
        return False
    try:
        actual = md5_file(path)
    except OSError as e:
        problems.append("%s: cannot be read (%s)" % (name, e))
        missing.append(name)
        return False
    if actual != expected:
        problems.append(
            "%s: checksum mismatch (expected md5 %s, got %s): the file is "
            "corrupted or incomplete" % (name, expected, actual)
        )
        mismatched.append(name)
        return False
    return True


def _raise_problems(checklist_path, problems, missing, mismatched, verified=()):
    header = "%d file%s failed verification against %s:" % (
        len(problems),
        "" if len(problems) == 1 else "s",
        checklist_path,
    )
    message = "\n".join([header] + ["  " + p for p in problems] + [_REDOWNLOAD_HINT])
    raise ChecklistError(message, problems, missing, mismatched, verified)


def verify_checklist(checklist_path, directory=None, only=None) -> list[str]:
    """Check every file listed in ``checklist_path``; return the verified names.

    Names are relative to the checklist's own folder, or to ``directory`` when
    given. ``only`` (an iterable of names) restricts the check to those names;
    a name in ``only`` that the checklist does not list is a problem too.
    Raises ``ChecklistError`` listing every missing or mismatching file at once.
    """
    entries = parse_checklist(checklist_path)
    if directory is None:
        directory = os.path.dirname(os.path.abspath(checklist_path))

    problems, missing, mismatched = [], [], []
    if only is not None:
        if isinstance(only, str):
            only = [only]
        wanted = set(only)
        listed = {name for _, name in entries}
        for name in sorted(wanted - listed):
            problems.append(
                "%s: not listed in %s, so it cannot be verified" % (name, checklist_path)
            )
            missing.append(name)
        entries = [(md5, name) for md5, name in entries if name in wanted]

    verified = []
    for expected, name in entries:
        path = os.path.join(directory, name)
        if _check_one(expected, name, path, problems, missing, mismatched):
            verified.append(name)

    if problems:
        _raise_problems(checklist_path, problems, missing, mismatched, verified)
    return verified


def verify_file(checklist_path, name, path) -> str:
    """Check the file at ``path`` against the checklist entry for ``name``.

    Used to verify a download (``NAME.part``) before it gets its final name.
    Returns ``name``; raises ``ChecklistError`` on any problem.
    """
    entries = [e for e in parse_checklist(checklist_path) if e[1] == name]
    problems, missing, mismatched = [], [], []
    if not entries:
        problems.append(
            "%s: not listed in %s, so it cannot be verified" % (name, checklist_path)
        )
        missing.append(name)
    for expected, _ in entries:
        _check_one(expected, name, path, problems, missing, mismatched)
    if problems:
        _raise_problems(checklist_path, problems, missing, mismatched)
    return name


def _build_parser(parser_class=argparse.ArgumentParser, prog="checklist.py"):
    parser = parser_class(
        prog=prog,
        description="Verify files against an md5 checklist (checklist.chk).",
    )
    parser.add_argument("checklist", metavar="CHECKLIST", help="the checklist file")
    parser.add_argument(
        "--dir",
        metavar="DIR",
        help="folder the listed names are relative to (default: the checklist's folder)",
    )
    parser.add_argument(
        "--only",
        metavar="NAME",
        nargs="+",
        action="append",
        help="verify only these listed names",
    )
    parser.add_argument(
        "--file",
        metavar="PATH",
        help="verify PATH against the entry of the single --only NAME "
        "(e.g. a NAME.part download before renaming it)",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="print the names the checklist lists, one a line, and verify nothing",
    )
    return parser


def main(argv=None, parser_class=argparse.ArgumentParser, prog="checklist.py") -> int:
    """The command line. As a plain script (download.sh) argparse's own parser reads it;
    `python -m llama.checklist` passes the other tools' (llama.cli.flags.ArgumentParser)."""
    parser = _build_parser(parser_class, prog)
    args = parser.parse_args(argv)
    only = None
    if args.only:
        only = [name for group in args.only for name in group]
    try:
        if args.list:
            for _, name in parse_checklist(args.checklist):
                print(name)
            return 0
        if args.file is not None:
            if not only or len(only) != 1:
                parser.error("--file needs exactly one --only NAME")
            names = [verify_file(args.checklist, only[0], args.file)]
        else:
            names = verify_checklist(args.checklist, directory=args.dir, only=only)
    except ChecklistError as e:
        for name in e.verified:
            print("%s: OK" % name)
        sys.stdout.flush()
        print("error: %s" % e, file=sys.stderr)
        return 1
    for name in names:
        print("%s: OK" % name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
