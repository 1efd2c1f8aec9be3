"""Every ```python block of README.md runs, each in a fresh process (so a snippet cannot rot).

Directly before a block, an HTML comment (invisible on GitHub) may give

* ``<!-- test-setup ... -->``: Python run first, defining what the snippet takes from the reader's
  own program (``num_classes``, a ``backbone``, small data); the snippet itself runs unchanged;
* ``<!-- skip-test: reason -->``: not run (only for blocks that need a process group on GPUs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import List, NamedTuple, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
_COMMENT = re.compile(r"<!--\s*(test-setup|skip-test:)(.*?)-->\s*\Z", re.S)


class Block(NamedTuple):
    line: int
    code: str
    setup: str
    skip: Optional[str]


def readme_blocks(text: str) -> List[Block]:
    """The ```python blocks of ``text`` with the setup / skip comment right before each."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            before = "\n".join(lines[max(0, i - 40) : i])
            setup, skip = "", None
            match = _COMMENT.match(before[before.rfind("<!--") :]) if "<!--" in before else None
            if match:
                if match.group(1) == "test-setup":
                    setup = match.group(2).strip("\n")
                else:
                    skip = match.group(2).strip()
            blocks.append(Block(i + 1, "\n".join(lines[i + 1 : end]), setup, skip))
            i = end
        i += 1
    return blocks


with open(README, encoding="utf-8") as _f:
    BLOCKS = readme_blocks(_f.read())


def test_blocks_found_and_skips_are_rare_and_explained():
    assert len(BLOCKS) >= 10
    skipped = [b for b in BLOCKS if b.skip is not None]
    assert len(skipped) <= 3, [b.line for b in skipped]
    assert all(len(b.skip) > 20 for b in skipped)


def test_parser_reads_setup_and_skip_comments():
    text = "x\n<!-- test-setup\na = 1\n-->\n```python\nprint(a)\n```\n<!-- skip-test: needs GPUs here -->\n```python\nboom\n```\n```python\nb = 2\n```\n"
    a, b, c = readme_blocks(text)
    assert (a.setup, a.code, a.skip) == ("a = 1", "print(a)", None)
    assert b.skip == "needs GPUs here" and b.setup == ""
    assert c.setup == "" and c.skip is None  # a comment before an earlier block does not carry over


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.line}" for b in BLOCKS])
def test_readme_block_runs(block, tmp_path):
    if block.skip is not None:
        pytest.skip(block.skip)
    if "fastreid" in block.code:
        pytest.importorskip("fastreid")
    if "timm" in block.code:
        pytest.importorskip("timm.task")
    if "pml" in block.code:
        pytest.importorskip("pytorch_metric_learning")
    script = tmp_path / "snippet.py"
    script.write_text(
        "import torch\ntorch.set_num_threads(1)\n"
        + block.setup
        + "\n# --- README.md block\n"
        + block.code
        + "\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"\nREADME.md block at line {block.line}: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, (
        f"README.md line {block.line}:\n" + proc.stdout[-2000:] + proc.stderr[-4000:]
    )
