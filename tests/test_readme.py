"""The README's commands, read from README.md and run: the main command as written, the walkthrough with
the options of its "small-scale options" table appended (so a README command cannot break unnoticed).

The commands run in-process through the console-script functions that ``pyproject.toml`` declares, in a
scratch directory beside a link to ``../shared`` (as a checkout sits beside it). ``pip install`` steps are
what CI itself runs before the tests, and the README's test command is checked against ``.ci/run``.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(section title, body)`` of every ```bash block."""
    blocks, section = [], ""
    for m in re.finditer(r"^(#+ [^\n]*)$|^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        if m.group(1):
            section = m.group(1).lstrip("# ").strip()
        else:
            blocks.append((section, m.group(2)))
    return blocks


def commands(body: str) -> list[str]:
    """The shell commands of a block: comments dropped, ``\\`` continuations joined, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.extend(part.strip() for part in line.split("&&"))
    return out


def small_scale_table(text: str) -> dict[str, list[str]]:
    """``{command prefix: options}`` from the README table headed ``| command | small-scale options |`` (the
    first code span of each cell; words after it are comments)."""
    start = text.index("| command | small-scale options |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        prefix, options = (re.match(r"`([^`]*)`", c).group(1) for c in cells[:2])  # a cell's first code span
        rows[prefix] = shlex.split(options)
    return rows


def entry_points() -> dict[str, object]:
    """The console scripts of pyproject.toml, as the functions they call."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    out = {}
    for name, target in scripts.items():
        module, func = target.split(":")
        out[name] = getattr(importlib.import_module(module), func)
    return out


def with_small_scale(command: str, table: dict[str, list[str]]) -> list[str]:
    """``command`` as argv with the options of the longest table prefix it starts with appended."""
    matches = [p for p in table if command == p or command.startswith(p + " ")]
    extra = table[max(matches, key=len)] if matches else []
    return shlex.split(command) + extra


def test_readme_test_command_is_what_ci_runs():
    text = README.read_text()
    tests = [c for _, body in code_blocks(text) for c in commands(body) if " -m pytest" in c]
    assert tests == ["python3 -m pytest -q -rs"], tests  # -rs: skip reasons are shown (issue 16, item 14)
    ci = (ROOT / ".ci" / "run").read_text()
    ci_pytest = next(line for line in ci.splitlines() if "-m pytest" in line)
    assert ci_pytest.strip().endswith(tests[0]), ci_pytest
    readme_installs = {c.split("-e ", 1)[1] for _, b in code_blocks(text) for c in commands(b) if "pip install" in c}
    ci_install = next(line for line in ci.splitlines() if "pip install" in line)
    assert ci_install.split("-e ", 1)[1] in readme_installs


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch, shared, capsys):
    text = README.read_text()
    table = small_scale_table(text)
    scripts = entry_points()
    blocks = code_blocks(text)
    main_block = next(body for title, body in blocks if title.startswith("Install and run"))
    walkthrough = next(body for title, body in blocks if title.startswith("Walkthrough"))
    main_cmds = [c for c in commands(main_block) if not c.startswith("python3 -m pip")]
    walk_cmds = commands(walkthrough)
    assert len(main_cmds) == 1 and len(walk_cmds) >= 10
    used = {p for p in table for c in walk_cmds if c == p or c.startswith(p + " ")}
    assert used == set(table), f"table rows that match no walkthrough command: {set(table) - used}"

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    monkeypatch.chdir(checkout)
    ran = []
    for command, argv in [(c, shlex.split(c)) for c in main_cmds] + [(c, with_small_scale(c, table))
                                                                       for c in walk_cmds]:
        assert argv[0] in scripts, f"README command is not one of the console scripts {sorted(scripts)}: {command}"
        capsys.readouterr()
        rc = scripts[argv[0]](argv[1:])
        out = capsys.readouterr()
        assert rc == 0, f"README command failed (exit {rc}):\n  {shlex.join(argv)}\n{out.out[-3000:]}\n{out.err[-3000:]}"
        ran.append(argv[:2])
    # what the commands promise is there, and nothing was written into the checkout outside runs/
    for path in ("runs/nsdd-edge-preview.png", "runs/nsdd-edge-stats.json", "runs/psf.npy", "runs/faces64/dataset.json",
                 "runs/eval/metrics.json", "runs/prior/model.safetensors", "runs/student/config.json",
                 "runs/student_paper/config.json", "runs/model.onnx", "runs/verify.json", "runs/bundle/bundle.json"):
        assert (checkout / path).exists(), path
    assert sorted(p.name for p in checkout.iterdir()) == ["runs"]
    assert ["nsdd-edge", "run"] in ran and ["nsdd-export", "bundle"] in ran
