"""The examples in README.md and docs/*.md run as written, as a user runs them: each block in a
fresh process without TRITON_INTERPRET (under the interpreter, Triton kernels at DeiT-S sizes
take minutes), on one thread, within a time budget that scales with the machine's load."""
import pathlib
import re
import sys

import pytest
from conftest import fresh_process_env, run_within_budget

ROOT = pathlib.Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: pathlib.Path) -> list:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


BLOCKS = [(page, i, block) for page in PAGES for i, block in enumerate(python_blocks(page))]


def test_the_pages_hold_their_examples():
    """The README's four uses (ViT, Swin, backbone, training) and the docs' longer examples."""
    counts = {page.relative_to(ROOT).as_posix(): len(python_blocks(page)) for page in PAGES}
    assert counts["README.md"] >= 4
    assert counts["docs/models.md"] >= 2 and counts["docs/training.md"] >= 1 and counts["docs/api.md"] >= 1


@pytest.mark.parametrize("page,index,block", BLOCKS,
                         ids=[f"{page.relative_to(ROOT).as_posix()}-{i}" for page, i, _ in BLOCKS])
def test_example_runs(page, index, block):
    result = run_within_budget([sys.executable, "-c", block], 300, f"{page.name} example {index}",
                               env=fresh_process_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]


def test_relative_links_resolve():
    """Every link from the README and the docs to a file of the repository (or an anchor of a
    page) points at something that exists."""
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target}"
            if anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{page.name}: {target}"
