"""Every ```python block of README.md runs, as a user would run it.

Each block runs alone, in a fresh process, from an empty working directory,
against the installed wheel (conftest.installed_package), not the checkout:
a block must import what it uses and write only relative or temporary paths.
"""

import pathlib
import re
import textwrap

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list:
  """(first line number, dedented code) of each ```python block (also indented ones)."""
  return [(text.count("\n", 0, m.start()) + 2, textwrap.dedent(m.group(2)))
          for m in _BLOCK.finditer(text)]


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_blocks():
  assert BLOCKS, f"{README} has no ```python block: nothing of the tour is checked"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs(installed_package, tmp_path, line, code):
  proc = installed_package.run(code, tmp_path)
  if proc.returncode != 0:
    pytest.fail(f"README.md:{line}: the block exits with {proc.returncode}:\n{code}\n"
                f"{proc.stderr[-3000:]}", pytrace=False)
