"""Install llama.cpp's HF -> GGUF converter into the venv, for `tutelage.gguf`.

The converter is not on PyPI as a package, but the llama-cpp-python source release vendors the
llama.cpp tree it was built from. Taking it from the same version as the installed llama_cpp keeps
the files we write loadable by the runtime we test them with. Only the converter's own files are
kept (convert_hf_to_gguf.py, its `conversion` package, gguf-py, the licence), under
`$VENV/share/tutelage/llama.cpp/`.

Repeatable and idempotent: a VERSION file names what is installed; a second run with the same
version does nothing and needs no network. Usage (with the venv's python):

    python scripts/fetch_gguf_converter.py [--version 0.3.36] [--sdist FILE.tar.gz] [--force]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGE = "llama-cpp-python"
# What the converter needs at run time, relative to vendor/llama.cpp/ in the sdist.
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def default_target() -> Path:
    return Path(sys.prefix) / "share" / "tutelage" / "llama.cpp"


def installed_version() -> str | None:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None


def download_sdist(version: str, into: Path) -> Path:
    """The sdist from the configured index, by this interpreter's pip (no build, no deps)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "download",
        "-q",
        f"{PACKAGE}=={version}",
        "--no-binary",
        ":all:",
        "--no-deps",
        "-d",
        str(into),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not found:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise SystemExit(
            f"fetch_gguf_converter: pip download {PACKAGE}=={version} failed: "
            f"{lines[-1] if lines else 'no sdist'}"
        )
    return found[0]


def extract(sdist: Path, version: str, dest: Path) -> None:
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(prefix) or not (m.isfile() or m.isdir()):
                continue
            rel = m.name[len(prefix) :]
            if rel and any(rel == k or rel.startswith(k) for k in KEEP):
                m.name = rel
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise SystemExit(
                f"fetch_gguf_converter: {sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py in it"
            )
        # The "data" filter refuses links and paths outside dest (Python >= 3.10.12 / 3.11.4).
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", help="llama-cpp-python version (default: the installed one)")
    parser.add_argument("--sdist", type=Path, help="an already downloaded sdist (no network)")
    parser.add_argument("--target", type=Path, default=default_target())
    parser.add_argument("--force", action="store_true", help="reinstall even if up to date")
    args = parser.parse_args()

    version = args.version or installed_version()
    if not version:
        raise SystemExit("fetch_gguf_converter: llama_cpp_python is not installed; pass --version")
    target: Path = args.target
    stamp = target / "VERSION"
    if not args.force and stamp.exists() and stamp.read_text().strip() == version:
        return

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        sdist = args.sdist or download_sdist(version, tmp / "download")
        staged = tmp / "llama.cpp"
        extract(sdist, version, staged)
        (staged / "VERSION").write_text(version + "\n")
        # Swap in whole: an interrupted run leaves the old tree or none, never a mix.
        old = tmp / "old"
        if target.exists():
            target.rename(old)
        staged.rename(target)
    print(f"llama.cpp converter {version} -> {target}")


if __name__ == "__main__":
    main()
