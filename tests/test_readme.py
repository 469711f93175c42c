"""The README's commands and snippet are the ones that work."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    commands = [b.strip() for b in readme_blocks("bash")]
    assert len(commands) == 2
    install_and_demo, install_and_test = commands
    assert install_and_demo.endswith("rlhf-jax demo")
    assert "pip install torch==2.13.0 && pip install -e '.[test]'" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci  # verbatim, as its own line


def test_readme_library_snippet_runs(tmp_path, monkeypatch):
    (snippet,) = readme_blocks("python")
    snippet = snippet.replace("/tmp/tiny_llama", str(tmp_path / "tiny_llama"))
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["logits"].shape == (2, 5, 512)
    assert (tmp_path / "tiny_llama" / "config.json").exists()
