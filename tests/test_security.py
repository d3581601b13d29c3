"""Security defaults (docs/reliability.md): nothing evaluates user input outside MONAI's config parser, servers
listen on loopback unless told otherwise, uploads live in private folders that are removed, and the README says
what MONAI's config warning means."""

from __future__ import annotations

import ast
import re
import stat
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from her2_monai.cli import main

PYTHON_ROOTS = ("her2_monai", "benchmarks", "scripts")
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "bundle/docs/README.md"]

#: Calls that run code or shell commands built from data.
_FORBIDDEN_NAMES = {"eval", "exec", "compile", "__import__"}
_FORBIDDEN_ATTRIBUTES = {
    ("os", "system"),
    ("os", "popen"),
    ("pickle", "load"),
    ("pickle", "loads"),
    ("marshal", "loads"),
}


def _python_files() -> list[Path]:
    return [p for root in PYTHON_ROOTS if (REPO_ROOT / root).is_dir() for p in sorted((REPO_ROOT / root).rglob("*.py"))]


def _dangerous_calls(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in _FORBIDDEN_NAMES:
            found.append(f"{node.lineno}: {func.id}()")
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if (func.value.id, func.attr) in _FORBIDDEN_ATTRIBUTES:
                found.append(f"{node.lineno}: {func.value.id}.{func.attr}()")
            if func.value.id == "yaml" and func.attr == "load":
                found.append(f"{node.lineno}: yaml.load() (use yaml.safe_load)")
            if func.attr == "import_module" and not all(isinstance(a, ast.Constant) for a in node.args):
                found.append(f"{node.lineno}: import_module() of a computed name")
        for keyword in node.keywords:
            safe = isinstance(keyword.value, ast.Constant) and keyword.value.value is False
            if keyword.arg == "shell" and not safe:
                found.append(f"{node.lineno}: shell=")
    return found


def test_no_code_evaluation_outside_monai_config_parser():
    files = _python_files()
    assert len(files) > 50, "the scan does not see the package"
    offenders = {str(p.relative_to(REPO_ROOT)): calls for p in files if (calls := _dangerous_calls(p.read_text()))}
    assert not offenders, offenders


def test_the_scan_sees_what_it_forbids():
    source = "import os, yaml\neval(x)\nos.system(c)\nyaml.load(s)\nsubprocess.run(c, shell=True)\nexec(y)\n"
    assert [c.split(":")[0] for c in _dangerous_calls(source)] == ["2", "3", "4", "5", "6"]


def test_predict_device_accepts_device_names_only(capsys, tmp_path):
    """``--device`` becomes a ``$torch.device(...)`` config expression: anything but a device name is refused."""
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    marker = tmp_path / "ran"
    hostile = f"cpu'); open('{marker}', 'w'); ('"
    code = main(["predict", "--image", str(image), "--bundle", str(tmp_path), "--device", hostile])
    err = capsys.readouterr().err
    assert code == 2 and "--device must be" in err and not marker.exists()


# ------------------------------------------------------------------------------------------------- servers
_SERVER_COMMAND = re.compile(r"(mlflow (?:ui|server)|monailabel start_server|python -m monailabel\.main start_server)")


def _server_commands() -> list[tuple[str, str]]:
    """``(where, command line)`` for every server command in the docs, configs, scripts and package docstrings.

    A command is a line that starts with it (after indentation, a prompt, a list marker or a quote); a mention of the
    command inside a sentence or inline code (``monailabel start_server --app`` in a docstring) is prose, not a
    command to run.
    """
    sources = DOCS + sorted((REPO_ROOT / "bundle" / "configs").glob("*.json")) + _python_files()
    sources += sorted((REPO_ROOT / "scripts").glob("*.sh"))
    commands = []
    for path in sources:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            match = _SERVER_COMMAND.search(line)
            if match and not line[: match.start()].strip(" \t$>*-`\"'") and "`" not in line[match.start() :]:
                commands.append((f"{path.relative_to(REPO_ROOT)}", line[match.start() :]))
    return commands


def test_every_documented_server_listens_on_loopback():
    commands = _server_commands()
    assert any("mlflow" in c for _, c in commands) and any("start_server" in c for _, c in commands)
    for where, command in commands:
        if "..." in command:  # prose pointing at a full command elsewhere
            continue
        host = re.search(r"--host[ =]+[\"']?([^\"'\s,]+)", command)
        if "start_server" in command:  # MONAI Label's own default is 0.0.0.0
            assert host and host.group(1) == "127.0.0.1", (where, command)
        elif host:
            assert host.group(1) in ("127.0.0.1", "localhost", '"127.0.0.1",'), (where, command)


def test_mlflow_listens_on_loopback_by_default():
    mlflow_cli = pytest.importorskip("mlflow.cli")
    host = next(p for p in mlflow_cli.server.params if p.name == "host")
    assert host.default == "127.0.0.1"


def test_uploads_live_in_a_private_folder_that_is_removed():
    """The MONAI Label app's upload folder (the HTTP tests check that none is left after bad requests)."""
    pytest.importorskip("fastapi")
    from her2_monai.label_app.uploads import private_workdir

    with pytest.raises(RuntimeError, match="request failed"):
        with private_workdir() as folder:
            (folder / "upload.bin").write_bytes(b"patient data")
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            raise RuntimeError("request failed")
    assert not folder.exists()


def test_readme_explains_monai_config_warning():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Security") :]
    for phrase in ("GHSA-873f-pvrv-4x83", "_target_", "eval()", "untrusted", "weights_only=True", "127.0.0.1"):
        assert phrase in section, phrase
    assert "docs/reliability.md" in section
