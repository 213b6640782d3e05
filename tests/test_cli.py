"""`neuronserve` command-line mistakes: one line on stderr and exit 2, never a traceback, and
nothing loaded or bound before the mistake is found."""

from __future__ import annotations

import pytest

from server.cli import main
from tests.conftest import _free_port


def _fails_with(capsys, argv: list[str], *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def test_serve_refuses_a_file_that_is_not_gguf(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_text("garbage")
    _fails_with(capsys, ["serve", "--model", str(fake)], "GGUF magic")


def test_serve_refuses_a_checkpoint_directory_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    _fails_with(capsys, ["serve", "--model", str(tmp_path)], "no *.safetensors")


@pytest.mark.parametrize("value, words", [
    ("[{bad", ("--default-interventions", "not JSON")),
    ('{"type": "steer"}', ("--default-interventions", "JSON list")),
    ('[{"type": "teleport"}]', ("--default-interventions", "entry 0")),
    ('[{"type": "steer", "vector": "calm", "strength": 1e9}]', ("--default-interventions", "strength")),
])
def test_serve_checks_default_interventions_before_loading(capsys, value, words):
    _fails_with(capsys, ["serve", "--default-interventions", value], *words)


def test_settings_errors_name_the_flag_on_one_line(capsys):
    _fails_with(capsys, ["serve", "--port", "99999"], "--port:", "65535")


def test_an_environment_variable_that_does_not_parse(monkeypatch, capsys):
    monkeypatch.setenv("NEURONSERVE_PROFILES", "/some/dir")
    _fails_with(capsys, ["serve"], "profiles")


@pytest.mark.parametrize("method, extra", [
    ("wina", []),
    ("sae", []),
    ("eigenshift", []),
    ("vector", ["--positive", "p.txt", "--negative", "n.txt", "--layer", "3"]),
    ("memorization", ["--memorized", "m.jsonl"]),
])
def test_calibrate_with_a_missing_model_is_one_line(tmp_path, capsys, method, extra):
    _fails_with(capsys, ["calibrate", method, "--model", str(tmp_path / "nope"), *extra], "does not exist")


def test_calibrate_wina_refuses_a_non_positive_count(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "wina", "--sequences", "-5"])
    assert exit_info.value.code == 2
    assert "at least 1" in capsys.readouterr().err


def test_serve_exits_when_the_model_fails_to_load(tmp_path, capsys):
    """Past the quick checks (config.json and a weights file are there), the load itself fails:
    the process ends with status 1 instead of answering 503 for ever."""
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    assert main(["serve", "--model", str(tmp_path), "--port", str(_free_port()), "--log-level", "critical"]) == 1
    assert "failed to load" in capsys.readouterr().err


def test_serve_refuses_a_taken_port_before_loading_anything(capsys, monkeypatch):
    """A port in use ends the process at once (status 3) with the address named; the app, and so
    the model load it starts, is never built."""
    import socket

    import server.api.app

    def must_not_build(settings):
        raise AssertionError("the app was built although the port was taken")

    monkeypatch.setattr(server.api.app, "create_app", must_not_build)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "critical"]) == 3
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_exits_on_a_wina_profile_name_that_does_not_exist(capsys):
    assert main(["serve", "--wina-profile", "wina-typo", "--port", str(_free_port()), "--log-level", "critical",
                 "--no-load-interventions", "--no-warmup"]) == 1
    assert "no WINA profile 'wina-typo'" in capsys.readouterr().err


def test_version_flag(capsys):
    from server import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"neuronserve {__version__}"


@pytest.mark.parametrize("argv, prog", [
    (["serve", "--bogus"], "neuronserve serve"),
    (["calibrate", "wina", "--bogus"], "neuronserve calibrate wina"),
    (["calibrate", "memorization", "--memorized", "x.jsonl", "--bogus"], "neuronserve calibrate memorization"),
])
def test_an_unknown_flag_is_reported_by_its_subcommand(capsys, argv, prog):
    """With the subcommand's usage line, not the top-level one, which lists no flags."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"{prog}: error: unrecognized arguments: --bogus" in err and f"usage: {prog}" in err
