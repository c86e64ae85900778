"""Write an HF model folder as one GGUF file, for llama.cpp, llama-cpp-python or Ollama.

The conversion is llama.cpp's own `convert_hf_to_gguf.py`, run in a child process: it knows every
architecture's tensor layout (Q/K permutations, fused tensors, tokenizer types), and it changes with
llama.cpp, so we neither copy nor import it. It comes from `$TUTELAGE_LLAMA_CPP` (a llama.cpp
checkout) or else from the copy that `scripts/fetch_gguf_converter.py` installs into the venv,
taken from the same llama-cpp-python release as our runtime.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ENV_VAR = "TUTELAGE_LLAMA_CPP"
CONVERTER = "convert_hf_to_gguf.py"
# The converter's own types for a whole model; tq1_0/tq2_0 (ternary) only suit BitNet-style models.
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# A fast tokenizer, a SentencePiece model, or GPT-2-style vocab files: one is needed.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ConverterNotFound(RuntimeError):
    pass


def installed_converter_dir() -> Path:
    """Where scripts/fetch_gguf_converter.py puts the converter: inside the venv."""
    return Path(sys.prefix) / "share" / "tutelage" / "llama.cpp"


def find_converter() -> Path:
    """The converter script; its folder also holds the gguf-py it needs."""
    configured = os.environ.get(ENV_VAR)
    root = Path(configured).expanduser() if configured else installed_converter_dir()
    where = f"{ENV_VAR}={configured}" if configured else str(root)
    if not (root / CONVERTER).is_file():
        fix = (
            "point it at a llama.cpp checkout"
            if configured
            else f"run `make install` (scripts/fetch_gguf_converter.py) or set {ENV_VAR} to a "
            "llama.cpp checkout"
        )
        raise ConverterNotFound(f"{where}: no llama.cpp {CONVERTER} there; {fix}")
    # The PyPI gguf release lags the converter (e.g. gguf 0.19.0 lacks LazyChunkedTensor).
    if not (root / "gguf-py" / "gguf" / "__init__.py").is_file():
        raise ConverterNotFound(
            f"{where}: no gguf-py/ beside {CONVERTER}; the converter needs its own gguf package"
        )
    return root / CONVERTER


def export_gguf(hf_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """Convert the HF folder `hf_dir` to the GGUF file `out` (`outtype`: one of OUTTYPES).

    Quiet: the converter's output goes to `out` with suffix `.log`. Atomic: written as
    `out.partial`, renamed when complete. Raises ValueError for a folder or architecture the
    converter cannot take, RuntimeError (ConverterNotFound) for a missing converter or a failed
    conversion, each one line naming the folder and the converter's reason."""
    hf_dir, out = Path(hf_dir), Path(out)
    if outtype not in OUTTYPES:
        raise ValueError(f"GGUF type {outtype!r} is not one of {', '.join(OUTTYPES)}")
    config = _read_config(hf_dir)
    script = find_converter()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    log = out.with_suffix(".log")
    partial.unlink(missing_ok=True)

    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(script.parent / "gguf-py"), os.environ.get("PYTHONPATH")) if p
    )
    env["HF_HUB_OFFLINE"] = "1"  # a local folder only; never let a tokenizer load reach a hub
    env["TQDM_DISABLE"] = "1"  # progress bars would only clutter the log

    try:
        with tempfile.TemporaryDirectory(prefix="tutelage-gguf-") as tmp:
            source = _converter_input(hf_dir, config, Path(tmp))
            # The converter formats the output file name as a template ("{ftype}"): escape braces.
            name = partial.name.replace("{", "{{").replace("}", "}}")
            cmd = [
                sys.executable,
                str(script),
                str(source),
                "--outfile",
                str(partial.with_name(name)),
                "--outtype",
                outtype,
            ]
            with log.open("w", encoding="utf-8") as f:
                done = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env=env,
                    check=False,
                )
        if done.returncode != 0:
            reason = (
                _last_meaningful_line(log.read_text(encoding="utf-8", errors="replace"))
                or f"exit status {done.returncode}"
            )
            # An architecture or tokenizer the converter does not know: the input's fault.
            kind = ValueError if re.search("not supported|not recognized", reason) else RuntimeError
            raise kind(f"{hf_dir}: GGUF conversion failed: {reason} (log: {log})")
        if not _is_gguf(partial):
            raise RuntimeError(
                f"{hf_dir}: GGUF conversion failed: the converter wrote no GGUF file (log: {log})"
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _read_config(hf_dir: Path) -> dict:
    """The folder's config, after the checks whose failures the converter reports obscurely or
    not at all (without weights it writes a GGUF holding no tensors)."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{hf_dir}: not an HF model folder (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not config.get("architectures"):
        raise ValueError(f"{path}: no `architectures` entry (it names the model class to convert)")
    # The file names the converter reads: model*.safetensors, else pytorch_model*.bin.
    if not any(hf_dir.glob("model*.safetensors")) and not any(hf_dir.glob("pytorch_model*.bin")):
        raise ValueError(f"{hf_dir}: no weights (model*.safetensors or pytorch_model*.bin)")
    if not any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{hf_dir}: no tokenizer ({', '.join(TOKENIZER_FILES)})")
    return config


def _converter_input(hf_dir: Path, config: dict, tmp: Path) -> Path:
    """`hf_dir`, or a linked copy with the config keys the converter expects but recent
    transformers no longer writes: GPT-2 configs saved by transformers 5 lack `n_ctx`."""
    if config.get("model_type") == "gpt2" and "n_ctx" not in config and "n_positions" in config:
        # the same folder name: the converter names the model after it
        staged = tmp / (hf_dir.resolve().name or "model")
        staged.mkdir()
        for item in hf_dir.iterdir():
            if item.name != "config.json":
                (staged / item.name).symlink_to(item.resolve())
        fixed = {**config, "n_ctx": config["n_positions"]}
        (staged / "config.json").write_text(json.dumps(fixed, indent=2), encoding="utf-8")
        return staged
    return hf_dir


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _last_meaningful_line(text: str) -> str:
    """The converter's reason for failing: its last unindented line, which is the `XError: ...`
    line of a traceback or the error it logged before exiting (frames are indented)."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip() and not ln[0].isspace()]
    last = lines[-1] if lines else ""
    # "ERROR:hf-to-gguf:Model X is not supported" -> "Model X is not supported"
    return re.sub(r"^(ERROR|CRITICAL|WARNING|INFO):[\w.-]+:", "", last).strip()


# -- GGUF in: a GGUF file as a plain HF folder ------------------------------------------------
def gguf_to_hf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into an HF folder (fp32 safetensors plus tokenizer), once."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # A GGUF-loaded model carries a quantization config that blocks saving; the weights are
    # already dequantized, so rebuild a plain model from a clean config and move them over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Only a tied output head may be absent from the file; anything else is a broken conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"{gguf}: cannot convert (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out_dir)  # atomic: a killed conversion never leaves a half folder in place
    return out_dir


# -- GGUF out: the run's student, an exported folder -----------------------------------------
def write_student_gguf(run_dir: Path, outtype: str | None) -> dict:
    """RUN/student.gguf from RUN/student, for llama.cpp and Ollama: the metrics to record. A
    failed conversion is recorded, not raised: the HF student it starts from is already saved."""
    target = run_dir / "student.gguf"
    target.unlink(missing_ok=True)  # never a GGUF of another student beside this one
    if outtype is None:
        return {"gguf_type": None}
    try:
        export_gguf(run_dir / "student", target, outtype)
    except (RuntimeError, ValueError, OSError) as e:
        return {
            "gguf_type": outtype,
            "gguf_error": str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
        }
    return {"gguf_type": outtype, "gguf": str(target)}


def gguf_path(out: Path) -> Path:
    """Where export_model writes the GGUF for the folder `out`: `student/` -> `student.gguf`."""
    out = Path(out)
    if not out.name:  # "." or "/": name it after the folder it stands for
        out = out.resolve()
    return out.with_name(out.name + ".gguf")
