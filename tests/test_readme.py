"""README is the manual: every command's key block is what `detector <command> --help` prints, and every link in
the documents lands on a file and, where it names one, a heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from detector.cli import COMMANDS, main
from repo_paths import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCUMENTS = [README, REPO_ROOT / "ARCHITECTURE.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
KEY_BLOCK = re.compile(r"<details><summary>keys(?:: (bench \w+))?</summary>\s*```text\n(.*?)```", re.S)
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)#\s]*)(?:#([^)\s]+))?\)")


def key_blocks(text: str) -> dict[str, str]:
    """Command -> its README key block: a 'keys' block under the command's ### heading, or one named 'keys: bench x'."""
    blocks = {}
    for match in KEY_BLOCK.finditer(text):
        command = match.group(1) or re.findall(r"^### `detector ([^`]+)`", text[: match.start()], re.M)[-1]
        blocks[command] = match.group(2).rstrip("\n")
    return blocks


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a '#' line in a code block is no heading
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_every_command_has_one_key_block_in_readme() -> None:
    assert sorted(key_blocks(README.read_text())) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_readme_key_block_is_what_help_prints(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command.split(), "--help"]) == 0
    keys = "\n".join(line for line in capsys.readouterr().out.splitlines() if line.startswith("  "))
    assert keys.count("=") >= 1
    assert key_blocks(README.read_text()).get(command) == keys, f"paste `detector {command} --help`'s key lines into README"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_links_land_on_a_file_and_a_heading(document: Path) -> None:
    broken = []
    for target, anchor in LINK.findall(document.read_text()):
        path = (document.parent / target).resolve() if target else document
        if not path.exists() or (anchor and anchor not in heading_anchors(path)):
            broken.append(f"{target}#{anchor}" if anchor else target)
    assert not broken, f"{document.name}: links to nothing: {broken}"
