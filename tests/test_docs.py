"""The documentation a user reads first: README size, no narrative, and the fenced commands that a newcomer would type.

Every `bash` block of README.md and docs/ is read command by command. The plugin's commands are parsed by their real
argparse parsers (so every option and choice they show exists); every trainer named with `-tr` is found by nnU-Net's
own trainer lookup; every script and program they call exists; the cheap ones run as written: help texts, `doctor`
and `env`.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
README_MAX_LINES = 200

# Phrases of a lab notebook rather than a description of the software: how it was written, what was tried, what did
# not fit. Measured results carry their date, command and hardware instead.
DIARY_PHRASES = [
    "so far",
    "turned out",
    "did not fit",
    "didn't fit",
    "we found",
    "we tried",
    "we decided",
    "at first",
    "this session",
    "previous session",
    "earlier session",
    "previous issue",
    "this issue",
    "todo",
    "fixme",
    "for now",
    "no longer exists",
    "as of today",
    "kept because",
    "before the fix",
    "after the fix",
    "the best recipe measured",
    "on this cpu",
    "this 2-core",
]

PLACEHOLDER_VALUES = {"DATASET_ID": "501", "FOLD": "0"}
SHELL_BUILTINS = {"export", "eval", "source", "cd", "pip", "git", "pre-commit"}


def fenced_bash_commands(path: Path):
    """(line number, argv) of every command in the file's ```bash blocks: continuations joined, comments and
    leading VAR=value assignments dropped, $VARIABLES kept as written."""
    commands, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            in_block = line.strip() == "```bash" and not in_block
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        pending += line.rstrip().removesuffix("\\") + " "
        if line.rstrip().endswith("\\"):
            continue
        argv = shlex.split(pending, comments=True)
        pending = ""
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", argv[0]):
            argv = argv[1:]
        if argv[:1] == ["eval"] and re.fullmatch(r"\$\((.*)\)", argv[1]):
            argv = shlex.split(argv[1][2:-1])
        if argv:
            commands.append((start, argv))
    return commands


ALL_COMMANDS = [(path, number, argv) for path in DOC_FILES for number, argv in fenced_bash_commands(path)]


def _id(item):
    path, number, argv = item
    return f"{path.relative_to(REPO)}:{number}:{argv[0]}"


def _parser_of(argv):
    """The real argparse parser and the arguments it gets, for the plugin's own commands; else None."""
    if argv[0] == "nnunet_ssp":
        from nnunet_ssp.cli import build_parser

        return build_parser(), argv[1:]
    if argv[0] == "ssp_pretrain":
        from pretraining.cli import build_parser

        return build_parser(), argv[1:]
    if argv[:2] == ["bash", "scripts/reproduce_paper.sh"]:
        from nnunet_ssp.protocol import build_parser

        return build_parser(), argv[2:]
    return None


def test_readme_is_a_short_router():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    for page in re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines)):
        assert (REPO / page).exists(), f"README links {page}, which does not exist"


def _anchors(path: Path) -> set:
    """The fragments a Markdown page defines: GitHub's slugs of its headings, and explicit ``<a id=...>``."""
    text = path.read_text(encoding="utf-8")
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    slugs = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
    return slugs | set(re.findall(r'<a id="([^"]+)"', text))


def test_relative_links_in_docs_resolve():
    """Every relative link names an existing file, and its #fragment a heading of that file."""
    broken = []
    for path in DOC_FILES:
        for target, fragment in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", path.read_text(encoding="utf-8")):
            linked = path.parent / target if target else path
            if not linked.exists():
                broken.append(f"{path.relative_to(REPO)} -> {target}")
            elif fragment and linked.suffix == ".md" and fragment not in _anchors(linked):
                broken.append(f"{path.relative_to(REPO)} -> {target}#{fragment}: no such heading")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_no_diary_words():
    hits = []
    for path in DOC_FILES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            lower = line.lower()
            hits += [f"{path.relative_to(REPO)}:{number}: '{phrase}'" for phrase in DIARY_PHRASES if phrase in lower]
    assert not hits, "narrative phrases in the documentation:\n" + "\n".join(hits)


def test_docs_show_commands():
    """The extraction finds the commands a newcomer types (a guard against a parser that finds nothing)."""
    programs = {argv[0] for _, _, argv in ALL_COMMANDS}
    assert {"nnunet_ssp", "ssp_pretrain", "nnUNetv2_train", "nnUNetv2_plan_and_preprocess", "bash"} <= programs


@pytest.mark.parametrize("item", ALL_COMMANDS, ids=_id)
def test_fenced_command_is_valid(item):
    path, number, argv = item
    where = f"{path.relative_to(REPO)}:{number}: {shlex.join(argv)}"
    argv = [PLACEHOLDER_VALUES.get(token, token) for token in argv]
    if argv[0] in SHELL_BUILTINS:
        return
    if argv[0] in ("bash", "python"):
        script = argv[1]
        assert (REPO / script).is_file(), f"{where}: {script} does not exist"
    else:
        assert shutil.which(argv[0]), f"{where}: {argv[0]} is not on PATH"
    parsed = _parser_of(argv)
    if parsed is not None:
        parser, args = parsed
        try:
            parser.parse_args(args)
        except SystemExit as exit_:
            pytest.fail(f"{where}: rejected by its parser (exit {exit_.code})")


def test_trainers_in_docs_are_found_by_nnunet():
    """Every trainer a fenced command names with -tr, found by nnU-Net's own lookup (one process for all)."""
    trainers = sorted({argv[argv.index("-tr") + 1] for _, _, argv in ALL_COMMANDS if "-tr" in argv})
    assert trainers
    code = (
        "import sys; from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "missing = [name for name in sys.argv[1:] if find(name) is None]\n"
        "print(' '.join(missing)); sys.exit(bool(missing))"
    )
    lookup = subprocess.run([sys.executable, "-c", code, *trainers], capture_output=True, text=True, timeout=300)
    assert lookup.returncode == 0, f"nnU-Net cannot find: {lookup.stdout}\n{lookup.stderr[-2000:]}"


def _help_commands():
    """One help call per program and subcommand the docs use."""
    seen = {}
    for _, _, argv in ALL_COMMANDS:
        if argv[0] in ("nnunet_ssp",) and len(argv) > 1 and not argv[1].startswith("-"):
            seen.setdefault(f"nnunet_ssp {argv[1]}", ["nnunet_ssp", argv[1], "--help"])
        elif argv[0] == "ssp_pretrain":
            seen.setdefault("ssp_pretrain", ["ssp_pretrain", "--help"])
        elif argv[:2] == ["bash", "scripts/reproduce_paper.sh"]:
            seen.setdefault("reproduce_paper.sh", ["bash", "scripts/reproduce_paper.sh", "--help"])
        elif argv[0] == "python" and argv[1].startswith("benchmarks/"):
            seen.setdefault(argv[1], [sys.executable, argv[1], "--help"])
    return sorted(seen.items())


@pytest.mark.parametrize("name,argv", _help_commands(), ids=[name for name, _ in _help_commands()])
def test_help_texts_run(name, argv):
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, f"{name} --help:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("argv", [["nnunet_ssp", "env"], ["nnunet_ssp", "doctor"]], ids=" ".join)
def test_cheap_commands_run_as_written(argv, tmp_path):
    assert any(argv == a[: len(argv)] for _, _, a in ALL_COMMANDS), f"{' '.join(argv)} is no longer in the docs"
    env = dict(
        os.environ,
        nnUNet_raw=str(tmp_path / "raw"),
        nnUNet_preprocessed=str(tmp_path / "pre"),
        nnUNet_results=str(tmp_path / "res"),
    )
    for folder in ("raw", "pre", "res"):
        (tmp_path / folder).mkdir()
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}{result.stderr}"
