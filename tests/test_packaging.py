"""What `pip install .` installs, not the source tree: the package built as setuptools builds the
wheel's files (build_py), into a temporary directory, and run from there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    assert (out / "epmq" / "cli.py").is_file() and (out / "epmq_kernels" / "w4a16.py").is_file()
    return out


def run_installed(lib, cwd, code):
    """``code``'s stdout, run in ``cwd`` with the built package, not this checkout, importable."""
    env = dict(os.environ, PYTHONPATH=str(lib))
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_example_configs_are_installed(lib):
    """`epmq --help`, its errors and the README name configs/ and configs/files/: every file there
    goes into the package (it was left out: a pip-installed epmq named files it did not have)."""
    configs = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*") if p.is_file())
    assert len(configs) >= 9 and Path("files/merge-llm-ties.yaml") in configs
    missing = [str(p) for p in configs if not (lib / "epmq" / "configs" / p).is_file()]
    assert not missing, f"not installed: {missing}"


def test_the_installed_cli_finds_its_configs(lib, tmp_path):
    out = run_installed(lib, tmp_path, """if True:
        import json, io, contextlib
        import epmq
        from epmq.benches import example_configs
        from epmq.cli import build_parser, main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["merge", "configs/files/merge-llm-ties.yaml", "out"])
        print(json.dumps({"package": epmq.__file__, "examples": str(example_configs()), "rc": rc,
                          "error": err.getvalue(), "help": build_parser().format_help()}))""")
    seen = json.loads(out)
    installed = lib / "epmq" / "configs"
    assert Path(seen["package"]).resolve().parent == (lib / "epmq").resolve()  # (not this checkout's)
    assert Path(seen["examples"]).resolve() == installed.resolve()
    assert seen["rc"] == 2 and str(installed / "files" / "merge-llm-ties.yaml") in seen["error"]
    assert str(installed) in seen["help"]


def test_no_shipped_run_config_writes_beside_itself():
    """An experiment config's output.dir is relative to the config: one installed in the package
    would write its runs into site-packages."""
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        output = yaml.safe_load(path.read_text()).get("output") or {}
        assert "dir" not in output or Path(output["dir"]).is_absolute(), path


def test_ctrl_c_while_the_command_starts_ends_it_in_one_line(lib, tmp_path):
    """Ctrl-C in the seconds `epmq` spends importing torch, transformers and Triton (6 to 9 s on a
    2-core machine), before epmq.cli.main runs, ended the command in a traceback of torch's
    imports: the console script imported epmq.cli, and with it the package, before anything of
    epmq's could catch it. Now 130 and one line, as Ctrl-C in a command says it."""
    import configparser

    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    (info,) = tmp_path.glob("*.egg-info")
    entry_points = configparser.ConfigParser()
    entry_points.read(info / "entry_points.txt")
    module, function = entry_points["console_scripts"]["epmq"].split(":")
    # the console script pip writes, with Ctrl-C pressed while torch is imported
    script = f"""if True:
        import sys

        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt

        sys.meta_path.insert(0, Interrupt())
        from {module} import {function}
        sys.exit({function}())"""
    done = subprocess.run([sys.executable, "-c", script, "merge", "merge.yaml", "out"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(lib)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    assert done.stderr.split() == "epmq: interrupted while starting; nothing was done".split()
    assert not (tmp_path / "out").exists()


def _interrupt_torchs_import(hooks):
    """A sitecustomize.py in ``hooks`` that presses Ctrl-C as torch is imported, set before
    ``python -m`` looks for its module."""
    (hooks / "sitecustomize.py").write_text("""if True:
        import sys

        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt

        sys.meta_path.insert(0, Interrupt())""")


def test_ctrl_c_while_python_m_epmq_starts_ends_it_in_one_line(lib, tmp_path):
    """`python -m epmq` imports the package (torch, transformers, Triton) before its __main__ runs,
    so epmq_cli's catch is not on that path: Ctrl-C there ended in a traceback of torch's imports."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    _interrupt_torchs_import(hooks)
    done = subprocess.run([sys.executable, "-m", "epmq", "merge", "merge.yaml", "out"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=f"{hooks}{os.pathsep}{lib}"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    assert done.stderr.split() == "epmq: interrupted while starting; nothing was done".split()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options", [["-um"], ["-u", "-Bm"], ["-W", "ignore", "-qm"]])
def test_ctrl_c_while_python_m_epmq_starts_behind_other_options_ends_it_in_one_line(lib, tmp_path, options):
    """The interpreter's one-letter options cluster with -m (`python -um epmq`, unbuffered): the
    module run was looked for only after an argument "-m...", so Ctrl-C there ended in the
    traceback of torch's imports as before 1575311."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    _interrupt_torchs_import(hooks)
    done = subprocess.run([sys.executable, *options, "epmq", "merge", "merge.yaml", "out"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=f"{hooks}{os.pathsep}{lib}"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    assert done.stderr.split() == "epmq: interrupted while starting; nothing was done".split()


@pytest.mark.parametrize("options", [["-m"], ["-um"]])
def test_ctrl_c_while_another_python_m_tool_imports_epmq_stays_its_own(lib, tmp_path, options):
    """The catch above is for `python -m epmq` alone: a tool run as `python -m tool` whose package
    imports epmq had Ctrl-C there turned into 'epmq: interrupted while starting' and exit 130, its
    own handling of KeyboardInterrupt never reached."""
    hooks = tmp_path / "hooks"
    (hooks / "tool").mkdir(parents=True)
    _interrupt_torchs_import(hooks)
    (hooks / "tool" / "__init__.py").write_text("""if True:
        import sys

        try:
            import epmq  # noqa: F401
        except KeyboardInterrupt:
            print("tool: stopped", file=sys.stderr)
            sys.exit(3)""")
    (hooks / "tool" / "__main__.py").write_text("")
    done = subprocess.run([sys.executable, *options, "tool"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=f"{hooks}{os.pathsep}{lib}"), capture_output=True,
                          text=True, timeout=300)
    assert (done.returncode, done.stderr.strip()) == (3, "tool: stopped")
