import pytest
import torch

from dflash_core.cli import main
from dflash_core.pipeline import resolve_device


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--block-size", "0"], "--block-size must be between 2 and 64, got 0"),
        (["--block-size", "1"], "--block-size must be between 2 and 64, got 1"),
        (["--block-size", "100000"], "--block-size must be between 2 and 64, got 100000"),
        (["--no-draft", "--block-size", "7"], "--block-size needs a draft"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_invalid_engine_options_are_rejected(arguments, message, caplog):
    assert main(["generate", *arguments]) == 2
    assert message in caplog.text


def test_unknown_log_level_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--log-level", "verbose", "generate"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_gpu_is_rejected(caplog):
    assert resolve_device("auto") == torch.device("cpu")
    assert main(["generate", "--device", "cuda"]) == 2
    assert "device cuda was requested but torch" in caplog.text
    assert "pass --device cpu" in caplog.text


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="device 'tpu' is not supported; choose one of auto"):
        resolve_device("tpu")
