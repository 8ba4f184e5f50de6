"""Every ```python block of README.md and docs/*.md runs as it stands, on the bundled demo
model: a failure names the file and line of the block."""

import re

import pytest

from tests.conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks():
    for path in DOCUMENTS:
        text = path.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, match.start(1)) + 1
            yield pytest.param(path, line, match.group(1),
                               id=f"{path.relative_to(REPO)}:{line}")


BLOCKS = list(python_blocks())


def test_readme_has_python_blocks():
    assert any(block.values[0].name == "README.md" for block in BLOCKS)


README_SERVER = "http://127.0.0.1:8000"  # where README's client examples find the server


@pytest.fixture(scope="module")
def demo_server():
    """The server README's examples talk to: `python -m llama.server`, on a free port."""
    pytest.importorskip("fastapi")
    from tests.server_fixtures import running_server

    with running_server() as url:
        yield url


@pytest.mark.parametrize("path, line, code", BLOCKS)
def test_python_block_runs(path, line, code, request):
    if README_SERVER in code:  # a client of `python -m llama.server`: give it one
        code = code.replace(README_SERVER, request.getfixturevalue("demo_server"))
    # padded with blank lines, so that a traceback gives the line in the document
    source = "\n" * (line - 1) + code
    exec(compile(source, str(path), "exec"), {"__name__": "__main__"})
