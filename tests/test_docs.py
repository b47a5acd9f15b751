"""The docs tell the truth where a machine can check it: every repository file they cite exists,
and every ``--flag`` they show on a ``prefopt`` command line is a flag of that command."""

from __future__ import annotations

import argparse
import functools
import itertools
import re
from pathlib import Path

import pytest

from prefopt.cli.main import build_parser
from prefopt.config import TrainConfig, config_fields
from prefopt.trl_compat import TRL_KEYS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted((ROOT / "src").rglob("*.py"))  # docstrings and comments
TOP = ("src", "docs", "tests", "examples", "configs", "benchmarks")
PATH_RE = re.compile(r"(?<![\w./-])((?:" + "|".join(TOP) + r")/[\w./{},*-]*[\w}*/])")
PKG_RE = re.compile(r"(?<![\w/.-])(prefopt/[\w/]+\.py)\b")
MD_RE = re.compile(r"(?<![\w/.-])([\w-]+\.md)\b")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
# Markdown files prefopt and its benchmarks write (run, demo, --out folders): outputs, not citations.
WRITTEN = {"report.md", "README.md", "table.md"}


def expand(path: str) -> list[str]:
    """``configs/accelerate/{ddp,fsdp2}.yaml`` -> both paths."""
    parts = re.split(r"\{([^}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def missing_citations(text: str, base: Path, markdown: bool) -> list[str]:
    """Repository paths (``docs/x.md``, ``src/prefopt/...``, ``prefopt/x.py``), bare ``NAME.md``
    and (in Markdown) relative links in ``text`` that name no file; ``base``: the text's folder."""
    def found(path: str, *bases: Path) -> bool:
        return all(any(list(b.glob(p.rstrip("/"))) for b in bases) for p in expand(path))

    bad = [m for m in PATH_RE.findall(text) if not found(m, ROOT)]
    bad += [m for m in PKG_RE.findall(text) if not found("src/" + m, ROOT)]
    bad += [m for m in MD_RE.findall(text) if m not in WRITTEN and not found(m, base, ROOT, ROOT / "docs")]
    if markdown:
        for target in LINK_RE.findall(text):
            target = target.split("#")[0]
            if target and not re.match(r"[a-z]+:", target) and not found(target, base):
                bad.append(target)
    return sorted(set(bad))


@pytest.mark.parametrize("file", DOCS + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_files_exist(file):
    bad = missing_citations(file.read_text(encoding="utf-8"), file.parent, file.suffix == ".md")
    assert not bad, f"{file.relative_to(ROOT)} cites files that do not exist: {bad}"


def test_the_citation_checker_finds_missing_files():
    text = ("Maths: MATH.md section 2; see [losses](losses.md), [gone](gone.md#x), docs/nope.md, "
            "`prefopt/losses/nope.py`, configs/accelerate/{ddp,nope}.yaml; fine: docs/config.md, "
            "`prefopt/losses/offsets.py`, configs/accelerate/{ddp,fsdp2}.yaml, report.md.")
    assert missing_citations(text, ROOT / "docs", markdown=True) == [
        "MATH.md", "configs/accelerate/{ddp,nope}.yaml", "docs/nope.md", "gone.md", "prefopt/losses/nope.py"]


# --- command lines shown in the docs ---

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@functools.lru_cache(maxsize=1)
def command_flags() -> dict[str, set[str]]:
    flags = {}
    for name, p in _subparsers(build_parser()).items():
        subs = _subparsers(p)
        for sub, sp in subs.items():
            flags[f"{name} {sub}"] = {o for a in sp._actions for o in a.option_strings}
        flags[name] = {o for a in p._actions for o in a.option_strings}
    return flags


def command_lines(text: str) -> list[str]:
    """Every ``prefopt ...`` command in fenced code blocks and inline code, continuations joined."""
    lines = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`\n]*prefopt [^`\n]*)`", text)
    out = []
    for line in lines:
        line = re.split(r"\s#|\||&&|;", line)[0]
        m = re.search(r"(?:^|\s|-m )prefopt\s+(.*)", line)
        if m:
            out.append(m.group(1))
    return out


def flag_problems(text: str, flags: dict[str, set[str]]) -> list[str]:
    config_keys = {f"--{k}" for k in config_fields(TrainConfig)} | {f"--{k}" for k in TRL_KEYS}
    problems = []
    for rest in command_lines(text):
        words = rest.split()
        if not words or words[0] not in flags:
            continue
        command = words[0]
        if len(words) > 1 and f"{command} {words[1]}" in flags:
            command = f"{command} {words[1]}"
        for word in words:
            if not word.startswith("--"):
                continue
            flag = word.split("=")[0].rstrip(",.)")
            if flag in flags[command]:
                continue
            # `prefopt train ... --key value` in prose may stand for any config key of that command
            if flag in ("--key", "--flag") or (flag in config_keys and command in ("train", "reward train")
                                                and flag[2:] in TRL_KEYS):
                continue
            problems.append(f"prefopt {command}: {flag}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_flags_shown_for_a_command_exist(doc):
    problems = flag_problems(doc.read_text(encoding="utf-8"), command_flags())
    assert not problems, f"{doc.name} shows flags the command does not have: {problems}"


def test_the_flag_checker_catches_a_stale_flag():
    flags = command_flags()
    text = "```bash\nprefopt reward train --config f.yaml --beta 0.2 \\\n    --loss_type dpo\n```\n" \
           "and `prefopt eval --model P --num_sample 2`"
    assert flag_problems(text, flags) == ["prefopt reward train: --beta", "prefopt reward train: --loss_type",
                                          "prefopt eval: --num_sample"]
