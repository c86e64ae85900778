"""GGUF export through llama.cpp's converter: what llama.cpp computes from the file is what HF
computes from the folder, token for token and logit for logit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from helpers import save_tiny_model
from safetensors.torch import load_file, save_file

from tutelage.export import export_model
from tutelage.gguf import ENV_VAR, ConverterNotFound, export_gguf, find_converter, gguf_path
from tutelage.model_files import embedded_student_hf, embedded_teacher_hf
from tutelage.student_prompt import prompt_ids, student_prompt


def _converter_missing() -> str | None:
    try:
        find_converter()
    except ConverterNotFound as e:
        return str(e)
    return None


MISSING = _converter_missing()
needs_converter = pytest.mark.skipif(
    MISSING is not None,
    reason=f"llama.cpp's converter is not installed (`make install` installs it): {MISSING}",
)

PROMPT = student_prompt("Name three primary colours.")
# Largest logit error measured on the tiny models (logits spread about 0.16): f32 3e-4, f16 7e-4,
# bf16 4e-3, q8_0 1.2e-2; a Q/K layout error moves them by about 0.15 (see the test below).
# Within these, llama.cpp's top token can differ from HF's only where HF has a near-tie.
TOLERANCE = {"f32": 2e-3, "f16": 5e-3, "bf16": 2e-2, "q8_0": 5e-2}
# Random init leaves attention almost uniform, which would hide a wrong Q/K layout or RoPE; larger
# Q and K weights (GPT-2's fused c_attn: V too) make attention depend on them.
SHARPEN = 4.0


@pytest.fixture(scope="module")
def tokenizer():
    return tf.AutoTokenizer.from_pretrained(embedded_teacher_hf())


def sharpen_attention(folder: Path, names=("q_proj.weight", "k_proj.weight", "c_attn.weight")):
    path = folder / "model.safetensors"
    weights = load_file(path)
    save_file(
        {k: v * SHARPEN if k.endswith(names) else v for k, v in weights.items()},
        path,
        metadata={"format": "pt"},
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", tokenizer)
    sharpen_attention(folder)
    return folder


def save_tiny(kind: str, folder: Path, tokenizer) -> Path:
    """A 2-layer random model of another architecture the converter handles, same tokenizer."""
    torch.manual_seed(0)
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    layers = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    if kind == "gemma3":
        # llama.cpp scales Gemma 3 queries by 1/sqrt(head_dim), as the released sizes do; the
        # config default (256) only equals that for head_dim 256.
        model = tf.Gemma3ForCausalLM(
            tf.Gemma3TextConfig(**layers, **ids, query_pre_attn_scalar=16, sliding_window=512)
        )
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, **ids)
        )
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    sharpen_attention(folder)
    return folder


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def gguf_logits(path: Path, ids: list[int], threads: int = 1) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=threads, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def gguf_tokens(path: Path, text: str) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=False)
    finally:
        llm.close()


# -- the tiny Llama -----------------------------------------------------------------------------
@needs_converter
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_tiny_llama_gguf_computes_what_hf_computes(tmp_path, tiny_llama, tokenizer, outtype):
    out = tmp_path / "tiny.gguf"
    assert export_gguf(tiny_llama, out, outtype) == out
    assert not out.with_name(out.name + ".partial").exists()
    assert "successfully exported" in out.with_suffix(".log").read_text()

    ids = prompt_ids(tokenizer, PROMPT, "alpaca")
    assert gguf_tokens(out, PROMPT) == ids  # llama.cpp cuts the served prompt as training did
    ref, got = hf_logits(tiny_llama, ids), gguf_logits(out, ids)
    assert np.abs(got - ref).max() < TOLERANCE[outtype]


def test_the_tolerance_would_catch_a_wrong_weight_layout(tiny_llama, tokenizer):
    """The comparison above can fail: a converter that left Q/K in HF's rotate-half order for
    llama.cpp's RoPE, or that transposed a weight, moves the logits far past the tolerance."""
    ids = prompt_ids(tokenizer, PROMPT, "alpaca")
    ref = hf_logits(tiny_llama, ids)
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    config = model.config

    def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
        # each head's two rotary halves interleaved pairwise: the other RoPE layout
        return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).transpose(1, 2).reshape(w.shape)

    def shifted(edit) -> float:
        originals = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for layer in model.model.layers:
                edit(layer.self_attn)
            logits = model(torch.tensor([ids])).logits[0].numpy()
        model.load_state_dict(originals)
        return float(np.abs(logits - ref).max())

    def qk_permuted(attn):
        attn.q_proj.weight.copy_(interleave(attn.q_proj.weight, config.num_attention_heads))
        attn.k_proj.weight.copy_(interleave(attn.k_proj.weight, config.num_key_value_heads))

    def q_transposed(attn):
        attn.q_proj.weight.copy_(attn.q_proj.weight.T.clone())

    assert shifted(qk_permuted) > 10 * TOLERANCE["f16"]
    assert shifted(q_transposed) > 10 * TOLERANCE["f16"]


@needs_converter
@pytest.mark.parametrize("kind", ["gemma3", "gpt2"])
def test_other_architectures_compute_what_hf_computes(tmp_path, tokenizer, kind):
    # (Mistral goes through the converter's Llama class, tested above.) gpt2 also covers the
    # config written by transformers 5, which lacks the n_ctx the converter reads.
    folder = save_tiny(kind, tmp_path / kind, tokenizer)
    out = export_gguf(folder, tmp_path / f"{kind}.gguf", "f32")
    ids = prompt_ids(tokenizer, PROMPT, "alpaca")
    ref, got = hf_logits(folder, ids), gguf_logits(out, ids)
    assert np.abs(got - ref).max() < TOLERANCE["f32"]


@needs_converter
def test_export_model_writes_the_folder_and_the_gguf_beside_it(tmp_path, tiny_llama):
    run = tmp_path / "run"
    shutil.copytree(tiny_llama, run / "student")
    out = tmp_path / "exported" / "student"
    with pytest.raises(ValueError, match="q4_k"):
        export_model(run, out, gguf="q4_k")
    assert not out.exists() and not gguf_path(out).exists()

    assert export_model(run, out, gguf="q8_0") == out
    assert (out / "config.json").exists()
    assert gguf_path(out) == tmp_path / "exported" / "student.gguf"
    assert gguf_path(out).read_bytes()[:4] == b"GGUF"
    ids = list(range(10, 40))
    got, ref = gguf_logits(gguf_path(out), ids), hf_logits(tiny_llama, ids)
    assert np.abs(got - ref).max() < TOLERANCE["q8_0"]

    shutil.rmtree(out)
    with pytest.raises(FileExistsError, match="student.gguf"):
        export_model(run, out, gguf="f16")


# -- errors: one line, naming the folder --------------------------------------------------------
def test_a_missing_converter_is_one_clear_line(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match=f"{ENV_VAR}=.*empty: no llama.cpp convert_hf_to_gguf"):
        export_gguf(tiny_llama, tmp_path / "x.gguf")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "half"))
    with pytest.raises(ConverterNotFound, match="no gguf-py"):
        export_gguf(tiny_llama, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_folders_that_cannot_convert_are_refused_before_the_converter_runs(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="no config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    folder = shutil.copytree(tiny_llama, tmp_path / "model")
    (folder / "model.safetensors").unlink()  # the converter would write a GGUF with no tensors
    with pytest.raises(ValueError, match="model: no weights"):
        export_gguf(folder, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="GGUF type 'q4_0' is not one of f32, f16, bf16, q8_0"):
        export_gguf(tiny_llama, tmp_path / "x.gguf", "q4_0")
    assert not (tmp_path / "x.gguf").exists()


@needs_converter
def test_an_unsupported_architecture_is_one_clear_line(tmp_path, tiny_llama):
    folder = shutil.copytree(tiny_llama, tmp_path / "odd")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["OddForCausalLM"]}))
    out = tmp_path / "odd.gguf"
    with pytest.raises(ValueError) as err:
        export_gguf(folder, out)
    assert str(err.value) == (
        f"{folder}: GGUF conversion failed: Model OddForCausalLM is not "
        f"supported (log: {out.with_suffix('.log')})"
    )
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


@needs_converter
def test_broken_weights_are_one_clear_line(tmp_path, tiny_llama):
    folder = shutil.copytree(tiny_llama, tmp_path / "broken")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError, match=r"broken: GGUF conversion failed: \w+Error: ") as err:
        export_gguf(folder, tmp_path / "broken.gguf")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert not (tmp_path / "broken.gguf").exists()


# -- the real student ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.e2e
@needs_converter
def test_the_embedded_student_as_gguf_predicts_what_hf_predicts(tmp_path):
    """Gemma-3-270M (about 30 s): the file llama.cpp serves tokenizes the Alpaca prompt as training
    does and ranks the next tokens as HF does."""
    hf = embedded_student_hf()
    out = export_gguf(hf, tmp_path / "student.gguf", "f16")
    tokenizer = tf.AutoTokenizer.from_pretrained(hf)
    ids = prompt_ids(tokenizer, PROMPT, "alpaca")
    assert gguf_tokens(out, PROMPT) == ids
    ref, got = hf_logits(hf, ids), gguf_logits(out, ids, threads=2)
    # Measured within 0.04 of HF (f16 weights) on logits spanning about +-30.
    assert np.abs(got - ref).max() < 0.25
    # f16 may swap near-ties: llama.cpp's top token is HF's, or scores within 0.1 of it in HF.
    top = got.argmax(-1)
    assert (ref.max(-1) - ref[np.arange(len(ids)), top] < 0.1).all()
    assert top[-1] == ref[-1].argmax() or ref[-1].max() - np.sort(ref[-1])[-2] < 0.1


# -- installing the converter -------------------------------------------------------------------
def test_fetch_script_installs_only_the_converter_and_is_idempotent(tmp_path):
    """scripts/fetch_gguf_converter.py on a stand-in sdist: the converter's files only, a
    VERSION stamp, and a second run that changes nothing."""
    root = "llama_cpp_python-9.9.9/vendor/llama.cpp/"
    files = {
        "convert_hf_to_gguf.py": "# converter",
        "conversion/__init__.py": "",
        "gguf-py/gguf/__init__.py": "",
        "LICENSE": "MIT",
        "ggml/src/ggml.c": "int x;",
        "convert_lora_to_gguf.py": "# not needed",
    }
    src = tmp_path / "src"
    for name, text in files.items():
        (src / root / name).parent.mkdir(parents=True, exist_ok=True)
        (src / root / name).write_text(text)
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src / "llama_cpp_python-9.9.9", arcname="llama_cpp_python-9.9.9")
    target = tmp_path / "venv" / "share" / "tutelage" / "llama.cpp"
    script = Path(__file__).parents[1] / "scripts" / "fetch_gguf_converter.py"
    cmd = [
        sys.executable,
        str(script),
        "--version",
        "9.9.9",
        "--sdist",
        str(sdist),
        "--target",
        str(target),
    ]

    first = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    installed = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
    assert installed == {
        "convert_hf_to_gguf.py",
        "conversion/__init__.py",
        "gguf-py/gguf/__init__.py",
        "LICENSE",
        "VERSION",
    }
    assert (target / "VERSION").read_text().strip() == "9.9.9"
    stamp = (target / "VERSION").stat().st_mtime_ns
    sdist.unlink()  # up to date: the second run needs no sdist at all
    again = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and again.stdout == ""
    assert (target / "VERSION").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in target.parent.iterdir()) == ["llama.cpp"]  # no leftovers
