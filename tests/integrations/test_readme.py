"""Every ```python block of README.md (and of the docs pages moved out of it, ``DOCS_WITH_BLOCKS``)
runs, each in a fresh process (so a snippet cannot rot).

Directly before a block, an HTML comment (invisible on GitHub) may give

* ``<!-- test-setup ... -->``: Python run first, defining what the snippet takes from the reader's
  own program (``num_classes``, a ``backbone``, small data); the snippet itself runs unchanged;
* ``<!-- skip-test: reason -->``: not run (only for blocks that need a process group on GPUs).

A paragraph starting ``Output`` right after a block, then a fenced block, is what the block
prints: the run's output must match it (numbers within a rounding tolerance).
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
#: the Markdown files whose ```python blocks run: the README and the parts moved out of it
DOCS_WITH_BLOCKS = ("README.md", "docs/core-head.md")
_COMMENT = re.compile(r"<!--\s*(test-setup|skip-test:)(.*?)-->\s*\Z", re.S)


class Block(NamedTuple):
    line: int
    code: str
    setup: str
    skip: Optional[str]
    output: Optional[str] = None
    doc: str = "README.md"


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def printed_output(lines: List[str], end: int) -> Optional[str]:
    """The fenced block after the ``Output ...`` paragraph that follows the code block ending
    at line index ``end``, if any."""
    i = end + 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i >= len(lines) or not lines[i].startswith("Output"):
        return None
    while i < len(lines) and not lines[i].startswith("```"):
        i += 1
    close = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
    return "\n".join(lines[i + 1 : close])


def output_mismatches(expected: str, got: str, rel: float = 1e-4, abs_: float = 1e-3) -> List[str]:
    """Where ``got`` differs from ``expected``: the text between numbers must be equal, the
    numbers equal within ``rel`` / ``abs_`` (a BLAS's last digits, a printed rounding)."""
    bad = []
    exp_lines, got_lines = expected.strip().splitlines(), got.strip().splitlines()
    if len(exp_lines) != len(got_lines):
        return [f"{len(got_lines)} lines printed, {len(exp_lines)} in the README"]
    for e, g in zip(exp_lines, got_lines):
        e_nums, g_nums = _NUMBER.findall(e), _NUMBER.findall(g)
        same_numbers = len(e_nums) == len(g_nums) and all(
            abs(float(a) - float(b)) <= max(abs_, rel * abs(float(a)))
            for a, b in zip(e_nums, g_nums)
        )
        if _NUMBER.sub("#", e) != _NUMBER.sub("#", g) or not same_numbers:
            bad.append(f"README: {e}\nprinted: {g}")
    return bad


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
            code = "\n".join(lines[i + 1 : end])
            blocks.append(Block(i + 1, code, setup, skip, printed_output(lines, end)))
            i = end
        i += 1
    return blocks


def doc_blocks(doc: str) -> List[Block]:
    """The ```python blocks of the Markdown file ``doc`` (relative to the repository root)."""
    with open(os.path.join(ROOT, doc), encoding="utf-8") as fh:
        return [b._replace(doc=doc) for b in readme_blocks(fh.read())]


BLOCKS = [b for doc in DOCS_WITH_BLOCKS for b in doc_blocks(doc)]


def _block_id(block: Block) -> str:
    """``line<N>`` for the README's blocks (the ids of earlier releases), ``<page>-line<N>`` else."""
    page = "" if block.doc == "README.md" else os.path.basename(block.doc)[: -len(".md")] + "-"
    return f"{page}line{block.line}"


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
    assert a.output is None


def test_printed_output_is_read_and_compared():
    text = "```python\nprint(1.5)\n```\n\nOutput (rounded):\n\n```\nx 1.5000 |w| 2\n```\n"
    (block,) = readme_blocks(text)
    assert block.output == "x 1.5000 |w| 2"
    assert output_mismatches(block.output, "x 1.50001 |w| 2\n") == []
    assert output_mismatches(block.output, "x 1.6 |w| 2")  # a number off
    assert output_mismatches(block.output, "y 1.5 |w| 2")  # the text off
    assert output_mismatches(block.output, "x 1.5 |w| 2\nmore")  # a line more
    assert any(b.output for b in BLOCKS)  # README's FTL usage block


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[_block_id(b) for b in BLOCKS])
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
        + f"\n# --- {block.doc} block\n"
        + block.code
        + "\n"
    )
    # TMPDIR: what a snippet's setup puts in tempfile.mkdtemp() (fastreid checkpoints, ~250 MB)
    # goes with pytest's tmp_path instead of staying in /tmp after the run
    env = dict(
        os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MPLBACKEND="Agg", TMPDIR=str(tmp_path)
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"\n{block.doc} block at line {block.line}: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, (
        f"{block.doc} line {block.line}:\n" + proc.stdout[-2000:] + proc.stderr[-4000:]
    )
    if block.output is not None:  # what the README shows it prints
        mismatches = output_mismatches(block.output, proc.stdout)
        assert not mismatches, f"{block.doc} line {block.line}:\n" + "\n".join(mismatches)


def heading_anchors(text: str) -> set:
    """GitHub's anchors of the Markdown headings of ``text`` (lower case, punctuation dropped,
    spaces to hyphens, ``-1``, ``-2`` for repeats; fenced code skipped)."""
    anchors, seen, fenced = set(), {}, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(path: str) -> List[str]:
    """The ``[...](file#anchor)`` / ``[...](#anchor)`` links of the Markdown file ``path`` whose
    file or heading does not exist."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    bad, anchors = [], {}  # anchors per linked file, read once
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        file = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        if not os.path.isfile(file):
            bad.append(f"{target}#{anchor} (no such file)")
            continue
        if file not in anchors:
            with open(file, encoding="utf-8") as fh:
                anchors[file] = heading_anchors(fh.read())
        if anchor not in anchors[file]:
            bad.append(f"{target}#{anchor}")
    return bad


@pytest.mark.parametrize(
    "doc",
    [
        "README.md",
        "docs/real-faces.md",
        "docs/core-head.md",
        "docs/compatibility.md",
        "benchmarks/README.md",
    ],
)
def test_links_to_sections_resolve(doc, tmp_path):
    """Every link to a section (README <-> docs/*.md, within a file) names a heading
    that exists, by GitHub's anchor rules (sections get renamed as results move)."""
    assert broken_links(os.path.join(ROOT, doc)) == []
    page = tmp_path / "page.md"  # the check itself finds a renamed section
    page.write_text("# A title: `x` (y)\n\n## A title: `x` (y)\n\n[a](#a-title-x-y-1) [b](#gone)\n")
    assert broken_links(str(page)) == ["#gone"]


def test_the_layout_names_every_module_of_the_package():
    """README's "Layout" lists the package's modules (``checkpoints.py``, home of the public
    ``check_state_dict``, was missing: s52 docs audit)."""
    with open(README, encoding="utf-8") as fh:
        layout = fh.read().split("\n## Layout", 1)[1]
    package = os.path.join(ROOT, "feature_cloud")
    modules = [n for n in os.listdir(package) if n.endswith(".py") and n != "__init__.py"]
    modules += [n + "/" for n in os.listdir(package) if os.path.isdir(os.path.join(package, n))]
    missing = [
        n for n in modules if n != "__pycache__/" and not re.search(rf"\b{re.escape(n)}", layout)
    ]
    assert not missing, missing


def test_pml_wrapper_paragraph_asks_for_equal_batch_sizes():
    """s52 ddp finding 5: PML's ``DistributedLossWrapper`` aborts in its own all-gather when the
    ranks' batches differ in size (PML's ``CosFaceLoss`` too), while the README's "Batch sizes
    may differ between ranks" holds for the head's own gather only; the wrapper's paragraph
    listed the dtype, width and missing-labels failures, not this one."""
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    start = text.index("- With pytorch-metric-learning's `DistributedLossWrapper(loss)`")
    end = min(text.index("\n- ", start + 1), text.index("\n\n", start))
    paragraph = " ".join(text[start:end].split())
    assert "per-rank batches of different sizes" in paragraph
    assert "`drop_last=True`" in paragraph and "`CosFaceLoss`" in paragraph


def test_timm_evaluator_paragraph_says_a_data_write_within_an_evaluation_is_not_seen():
    """s54 trial 5: the class docstring of timm's ``LEAPEvaluator`` says that its cached scoring
    matrices miss a write through ``.data`` between ``update()`` calls of one evaluation (and
    that ``compute()`` / ``reset()`` drop them); the README's evaluator paragraph did not."""
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    start = text.index("- `create_evaluator()` reports timm's top-1/top-5 on the head's")
    end = text.index("\n- ", start + 1)
    paragraph = " ".join(text[start:end].split())
    assert "write through `.data`" in paragraph and "`update()` calls is not seen" in paragraph
    assert "`compute()` and `reset()` drop them" in paragraph
