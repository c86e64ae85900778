"""A student made from the teacher (depth pruning), and the same-vocabulary check."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from tutelage import prune
from tutelage.config import ConfigError, load_config
from tutelage.model_files import (
    STUDENT_BASE_DIR,
    check_same_vocabulary,
    embedded_teacher_hf,
    resolve_base_student,
    vocabulary_hash,
)
from tutelage.prune import kept_layers, prune_teacher, pruned_config

PROMPT_IDS = torch.tensor([[1, 504, 3458, 314, 253, 2495]])


def tiny_config(tokenizer, **overrides) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer random Llama with an untied head, so that the head is checked on its own."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher") / "llama4"
    LlamaForCausalLM(
        LlamaConfig(**tiny_config(tokenizer), tie_word_embeddings=False)
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def student(tmp_path_factory, teacher) -> Path:
    return prune_teacher(teacher, tmp_path_factory.mktemp("run") / STUDENT_BASE_DIR, 2)


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# -- the rule ----------------------------------------------------------------------------------
def test_the_rule_keeps_the_first_layers_and_the_last():
    assert kept_layers(4, 2) == [0, 3]
    assert kept_layers(30, 15) == [*range(14), 29]
    assert kept_layers(4, 4) == [0, 1, 2, 3]
    assert kept_layers(4, 1) == [3]
    assert kept_layers(4, 2, keep="first") == [0, 1]


@pytest.mark.parametrize("layers", [0, 5])
def test_a_layer_count_the_teacher_lacks_is_one_line_naming_the_field(tmp_path, teacher, layers):
    out = tmp_path / STUDENT_BASE_DIR
    with pytest.raises(ValueError, match=r"^student\.from_teacher\.layers: .*4 layers$"):
        prune_teacher(teacher, out, layers)
    assert not out.exists()


def test_the_configuration_refuses_zero_layers_and_a_second_student(tmp_path):
    with pytest.raises(ConfigError, match=r"student\.from_teacher\.layers"):
        load_config(None, {"student.from_teacher": {"layers": 0}})
    with pytest.raises(ConfigError, match=r"student\.from_teacher: .*leave student\.model unset"):
        load_config(None, {"student.from_teacher": {"layers": 2}, "student.model": str(tmp_path)})
    assert load_config(None).student.from_teacher is None  # off by default


# -- the surgery -------------------------------------------------------------------------------
def test_the_student_holds_the_kept_teacher_layers_and_the_rest_unchanged(teacher, student):
    big, small = load(teacher).state_dict(), load(student).state_dict()
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 2
    for name, tensor in small.items():
        # student layer 0 is teacher layer 0, student layer 1 is teacher layer 3
        source = name.replace("layers.1.", "layers.3.")
        assert torch.equal(tensor, big[source]), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(small[name], big[name])
    assert not any(name.startswith(("model.layers.2.", "model.layers.3.")) for name in small)


def test_the_student_loads_in_plain_transformers_and_generates(student, tokenizer):
    model = load(student)
    assert len(model.model.layers) == 2
    out = model.generate(PROMPT_IDS, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, PROMPT_IDS.shape[1] + 4)
    assert AutoTokenizer.from_pretrained(student).get_vocab() == tokenizer.get_vocab()
    assert (student / "generation_config.json").is_file()


def test_keeping_every_layer_computes_exactly_what_the_teacher_computes(tmp_path, teacher):
    copied = prune_teacher(teacher, tmp_path / STUDENT_BASE_DIR, 4)
    with torch.no_grad():
        assert torch.equal(load(copied)(PROMPT_IDS).logits, load(teacher)(PROMPT_IDS).logits)


def test_gemma3_layer_types_are_cut_with_their_layers_and_embeddings_stay_tied(tmp_path, tokenizer):
    torch.manual_seed(0)
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config = Gemma3TextConfig(**tiny_config(tokenizer), layer_types=types, sliding_window=16)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "gemma")
    tokenizer.save_pretrained(tmp_path / "gemma")

    out = prune_teacher(tmp_path / "gemma", tmp_path / STUDENT_BASE_DIR, 3)  # keeps 0, 1, 3

    expected = ["sliding_attention", "full_attention", "full_attention"]
    assert json.loads((out / "config.json").read_text())["layer_types"] == expected
    model = load(out)
    assert [layer.self_attn.is_sliding for layer in model.model.layers] == [True, False, False]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    teacher = load(tmp_path / "gemma")
    assert torch.equal(
        model.model.layers[2].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight
    )
    assert model.generate(PROMPT_IDS, max_new_tokens=3, do_sample=False).shape[1] == 9


def test_per_layer_lists_are_cut_and_layer_index_lists_are_refused():
    config = {"num_hidden_layers": 4, "layer_types": list("abcd"), "eos_token_id": [1, 2, 3, 4]}
    pruned = pruned_config(config, [0, 3])
    assert pruned["layer_types"] == ["a", "d"]
    assert pruned["eos_token_id"] == [1, 2, 3, 4]  # not about layers, though four long
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\].*not one entry per layer"):
        pruned_config({"num_hidden_layers": 4, "mlp_only_layers": [1]}, [0, 3])


# -- built once --------------------------------------------------------------------------------
def test_a_second_build_reuses_the_folder_and_another_rule_rebuilds_it(
    tmp_path, teacher, monkeypatch
):
    out = prune_teacher(teacher, tmp_path / STUDENT_BASE_DIR, 2)
    weights = (out / "model.safetensors").stat().st_mtime_ns

    def must_not_build(*args):
        raise AssertionError("rebuilt a folder that was up to date")

    with monkeypatch.context() as m:
        m.setattr(prune, "_write_pruned", must_not_build)
        assert prune_teacher(teacher, out, 2) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == weights

    prune_teacher(teacher, out, 2, keep="first")
    small, big = load(out).state_dict(), load(teacher).state_dict()
    key = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(small[key], big[key])  # now teacher layer 1, not 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [STUDENT_BASE_DIR]  # no leftovers


def test_a_failed_build_leaves_no_folder(tmp_path, teacher, monkeypatch):
    def broken(teacher_dir, out_dir, kept):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(prune, "_write_pruned", broken)
    with pytest.raises(RuntimeError):
        prune_teacher(teacher, tmp_path / STUDENT_BASE_DIR, 2)
    assert list(tmp_path.iterdir()) == []


# -- where the stages find it ------------------------------------------------------------------
def test_the_stages_start_from_the_pruned_teacher_when_configured(tmp_path, teacher, tiny_model):
    run_dir = tmp_path / "run"
    config = load_config(
        None,
        {
            "teacher.backend": "transformers",
            "teacher.model": str(teacher),
            "student.from_teacher": {"layers": 2},
        },
    )
    path = resolve_base_student(config, run_dir)
    assert path == run_dir / STUDENT_BASE_DIR
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 2

    plain = load_config(None, {"student.model": str(tiny_model)})
    assert resolve_base_student(plain, run_dir) == tiny_model


def test_training_starts_from_the_pruned_teacher(tmp_path, teacher):
    from helpers import add_examples

    from tutelage.store import Store
    from tutelage.train import train
    from tutelage.train.loop import fingerprint

    run_dir = tmp_path / "run"
    examples = [("Name a colour.", "", "Red."), ("Add the numbers.", "2 and 3", "5.")]
    overrides = {
        "run_dir": str(run_dir),
        "teacher.backend": "transformers",
        "teacher.model": str(teacher),
        "student.from_teacher": {"layers": 2},
        "training.max_steps": 1,
        "training.threads": 1,
        "training.gguf": None,
    }
    config = load_config(None, overrides)
    with Store(run_dir) as store:
        add_examples(store, examples, "train")
        train(store, config, run_dir)
        rows = store.examples(split="train"), store.examples(split="valid")
    info = json.loads((run_dir / "student" / "tutelage.json").read_text())
    assert info["base_path"] == str(run_dir / STUDENT_BASE_DIR)
    assert len(load(run_dir / "student").model.layers) == 2
    # Another teacher means other starting weights: the finished run is not reused.
    other = load_config(None, {**overrides, "teacher.model": str(tmp_path / "another")})
    assert fingerprint(other, *rows) != fingerprint(config, *rows)


def test_a_hosted_teacher_cannot_give_its_weights(tmp_path):
    config = load_config(
        None,
        {
            "teacher.backend": "openai",
            "teacher.model": "gpt-4o",
            "student.from_teacher": {"layers": 2},
        },
    )
    with pytest.raises(
        ValueError, match=r"^student\.from_teacher: the teacher's weights are needed"
    ):
        resolve_base_student(config, tmp_path)


# -- the same vocabulary -----------------------------------------------------------------------
def test_the_same_tokenizer_passes(tokenizer, student):
    check_same_vocabulary(tokenizer, tokenizer)
    reloaded = AutoTokenizer.from_pretrained(student)  # saved and read back: the same hash
    assert vocabulary_hash(reloaded) == vocabulary_hash(tokenizer)
    check_same_vocabulary(reloaded, tokenizer)


def test_an_added_token_is_a_different_vocabulary(tokenizer):
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(["<extra>"])
    n = len(tokenizer.get_vocab())
    with pytest.raises(ValueError) as e:
        check_same_vocabulary(grown, tokenizer)
    assert str(e.value) == (
        f"student.model and teacher.model have different vocabularies ({n + 1} vs {n} tokens; "
        f"first difference: id {n} is '<extra>' vs absent): logit distillation needs the same "
        "tokenizer; use student.from_teacher or a student of the teacher's family"
    )


def test_two_swapped_tokens_are_a_different_vocabulary(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    swapped = AutoTokenizer.from_pretrained(tmp_path)
    first = min(vocab["hello"], vocab["world"])
    mine = "'hello'" if vocab["hello"] == first else "'world'"
    theirs = "'world'" if mine == "'hello'" else "'hello'"
    with pytest.raises(ValueError, match=rf"first difference: id {first} is {mine} vs {theirs}\)"):
        check_same_vocabulary(swapped, tokenizer)


# -- the real teacher --------------------------------------------------------------------------
@pytest.mark.slow
def test_the_embedded_teacher_pruned_to_half_its_layers_loads_and_generates(tmp_path):
    teacher_dir = embedded_teacher_hf()
    out = prune_teacher(teacher_dir, tmp_path / STUDENT_BASE_DIR, 15)
    assert json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"] == 30
    model = load(out)
    assert len(model.model.layers) == 15
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out_ids = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out_ids.shape[1] == ids.shape[1] + 5
    check_same_vocabulary(tok, AutoTokenizer.from_pretrained(teacher_dir))
