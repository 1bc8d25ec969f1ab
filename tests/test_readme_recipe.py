"""README's GPU recipe can be copied and pasted: every command line names files, extras,
sub-commands, options and config keys that exist.

Reads the shell blocks of README "The paper's recipe" and the command lines in the header of
``configs/paper_llama3b.yaml``; a misnamed accelerate file or a missing install extra (as once
``docs/accelerate/zero2.yaml``) fails here, not on a rented cluster.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from manyways import cli
from manyways.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PATH_RE = re.compile(r"^(configs|docs|src|tests|benchmarks)/|\.(ya?ml|json|md|py|toml)$")


def recipe_section(readme: str) -> str:
    start = readme.index("## The paper's recipe")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else len(readme)]


def shell_lines(markdown: str) -> list[str]:
    """The command lines of the ```bash blocks, comments dropped, continuations joined."""
    lines: list[str] = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", markdown, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def header_lines(config: Path) -> list[str]:
    """Command lines quoted in a config's header comments (``#   cmd`` or ``...: cmd``)."""
    out = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        text = text.split(": ", 1)[1] if re.match(r"^[A-Z][\w -]+: ", text) else text
        if re.match(r"^(\w+=\S+ )*(pip|manyways|accelerate|python)\b", text):
            out.append(re.sub(r"\s#.*$", "", text))
    return out


def _extras() -> set[str]:
    """The extras of pyproject.toml (read by hand: tomllib is Python >= 3.11, we support 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, flags=re.M))


def problems_of(line: str) -> list[str]:
    """What in one command line does not exist (empty when the line is sound)."""
    found = []
    for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
        tokens = shlex.split(part)
        while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value cmd
            tokens.pop(0)
        if not tokens or tokens[0] == "export":
            continue
        found += _check_tokens(tokens)
    return found


def _check_tokens(tokens: list[str]) -> list[str]:
    found = []
    for tok in tokens:
        value = tok.split("=", 1)[1] if tok.startswith("--") and "=" in tok else tok
        if "=" not in value and PATH_RE.search(value) and not (ROOT / value).exists():
            found.append(f"file {value} does not exist")
        extras = re.match(r"^\.\[(.*)\]$", tok)
        if tokens[:2] == ["pip", "install"] and extras:
            found += [
                f"extra {e!r} is not in pyproject.toml"
                for e in extras.group(1).split(",")
                if e not in _extras()
            ]
    if "-m" in tokens:
        module = tokens[tokens.index("-m") + 1]
        if importlib.util.find_spec(module) is None:
            found.append(f"module {module} does not exist")
        if module == "manyways.cli":
            found += _check_manyways(tokens[tokens.index("-m") + 2 :])
    elif tokens[0] == "manyways":
        found += _check_manyways(tokens[1:])
    return found


def _check_manyways(argv: list[str]) -> list[str]:
    """The sub-command and options parse, and the overrides are keys of the config."""
    parser = cli.build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit:
        return [f"`manyways {' '.join(argv)}` does not parse"]
    bad = [e for e in extra if "=" not in e or e.startswith("-")]
    if bad:
        return [f"`manyways {' '.join(argv)}`: unknown options {bad}"]
    if getattr(args, "config", None):
        try:
            load_config(args.config, [*args.overrides, *extra])
        except ValueError as exc:
            return [f"`manyways {' '.join(argv)}`: {exc}"]
    return []


def test_every_recipe_command_names_what_exists():
    lines = shell_lines(recipe_section((ROOT / "README.md").read_text()))
    assert any(line.startswith("pip install") for line in lines)
    assert any("accelerate launch" in line for line in lines)
    assert any("--plan" in line for line in lines)
    problems = {line: p for line in lines if (p := problems_of(line))}
    assert problems == {}


def _run_invocations(line: str) -> list[tuple[str, tuple[str, ...]]]:
    """(config, overrides) of each manyways command in ``line`` that writes a run's config."""
    out = []
    for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
        tokens = shlex.split(part)
        argv = tokens[tokens.index("manyways.cli") + 1 :] if "manyways.cli" in tokens else None
        argv = tokens[tokens.index("manyways") + 1 :] if argv is None and "manyways" in tokens else argv
        if not argv:
            continue
        args, extra = cli.build_parser().parse_known_args(argv)
        if getattr(args, "config", None) and not getattr(args, "plan", False):
            out.append((args.config, tuple(sorted([*args.overrides, *extra]))))
    return out


def test_recipe_commands_of_one_run_agree_on_the_config():
    """A run refuses a command whose config differs from the one it started with, so the
    recipe's commands on one config file must pass the same overrides."""
    lines = shell_lines(recipe_section((ROOT / "README.md").read_text()))
    seen: dict[str, set[tuple[str, ...]]] = {}
    for line in lines:
        for config, overrides in _run_invocations(line):
            seen.setdefault(config, set()).add(overrides)
    assert seen and all(len(v) == 1 for v in seen.values()), seen
    assert len(_run_invocations("manyways generate c.yaml a.b=1 && manyways verify c.yaml")) == 2


def test_recipe_installs_what_the_config_needs():
    install = next(
        line
        for line in shell_lines(recipe_section((ROOT / "README.md").read_text()))
        if line.startswith("pip")
    )
    extras = set(re.search(r"\.\[(.*)\]", install).group(1).split(","))
    cfg = load_config(ROOT / "configs" / "paper_llama3b.yaml")
    needed = {"vllm"} if cfg.generate.backend.kind == "vllm" or cfg.evaluate.backend.kind == "vllm" else set()
    needed |= {"ray"} if cfg.generate.executor == "ray" else set()
    needed |= (
        {"wandb"}
        if "wandb" in [*cfg.midtrain.trl.get("report_to", []), *cfg.rl.trl.get("report_to", [])]
        else set()
    )
    needed |= {"embed"} if "embedding" in cfg.analyze.kernels else set()
    needed |= {"deepspeed"}  # the recipe's accelerate files are DeepSpeed configs
    assert needed <= extras


def test_paper_config_header_commands_name_what_exists():
    lines = header_lines(ROOT / "configs" / "paper_llama3b.yaml")
    assert any("accelerate launch" in line for line in lines)
    assert {line: p for line in lines if (p := problems_of(line))} == {}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (
            "accelerate launch --config_file docs/accelerate/zero2.yaml -m manyways.cli midtrain x",
            "zero2.yaml",
        ),
        ("pip install -e '.[vllm,gpu_stuff]'", "gpu_stuff"),
        ("manyways experiment configs/paper_llama3b.yaml --planx", "unknown options"),
        ("manyways generate configs/paper_llama3b.yaml generate.nope=1", "nope"),
        ("HF_HUB_OFFLINE=0 manyways nonsense configs/tiny_cpu.yaml", "does not parse"),
    ],
)
def test_the_checker_catches_broken_lines(line, problem):
    assert any(problem in p for p in problems_of(line))
