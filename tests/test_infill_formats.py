"""Each family's tokenizer loads with its own end-of-text and BOS, and each infill format lays out, id for id, what
its model card writes.

The tokenizers are small BPEs trained here carrying each family's special tokens and tokenizer_config.json
(Qwen2.5-Coder and StarCoder2 byte-level without BOS; DeepSeek-Coder byte-level with BOS; CodeLlama
SentencePiece-style (Metaspace) with BOS and its `▁<PRE>`-style FIM tokens). Expected ids are written from the
model cards' layouts: Qwen2.5-Coder `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`, StarCoder2
`<fim_prefix>...<fim_suffix>...<fim_middle>`, DeepSeek-Coder `<｜fim▁begin｜>...<｜fim▁hole｜>...<｜fim▁end｜>`
after BOS, CodeLlama `<s> <PRE> {pre} <SUF>{suf} <MID>` with the suffix encoded without a leading space.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from codegen2.errors import UserError
from codegen2.infill import (
    FORMATS,
    Specials,
    build_infill,
    detect_format,
    end_id,
    infill_prompt,
    infill_stop_ids,
    resolve_format,
)
from codegen2.tokenizer import CodeGenTokenizer, train_tokenizer

CORPUS = ["def add(a, b):\n    return a + b\n", "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
          "for i in range(10):\n    print(i * i)\n", "import os\nprint(os.path.join('a', 'b'))\n"] * 20

FAMILIES = {
    "qwen": (["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>"],
             {"eos_token": "<|endoftext|>", "bos_token": None}),
    "starcoder2": (["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>",
                    "<file_sep>", "<filename>", "<gh_stars>"],
                   {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}),
    "deepseek": (["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>",
                  "<｜fim▁end｜>", "<|EOT|>"],
                 {"add_bos_token": True, "bos_token": {"content": "<｜begin▁of▁sentence｜>"},
                  "eos_token": {"content": "<｜end▁of▁sentence｜>"}}),
    "codellama": (["<unk>", "<s>", "</s>", "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"],
                  {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
}


def family_tokenizer(directory: Path, family: str) -> CodeGenTokenizer:
    """Train a small BPE carrying `family`'s special tokens, save it with its tokenizer_config.json, load it."""
    specials, config = FAMILIES[family]
    if family == "codellama":
        backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[AddedToken(t, special=True, normalized=False)
                                                                  for t in specials], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if family != "codellama"
                                  else [])
    backend.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return CodeGenTokenizer.load(directory)


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, CodeGenTokenizer]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {family: family_tokenizer(root / family, family) for family in FAMILIES}


PRE, SUF = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"


def test_family_tokenizers_load_with_their_end_of_text_and_bos(toks):
    v = {family: tok.token_ids for family, tok in toks.items()}
    assert (toks["qwen"].eot_id, toks["qwen"].bos_id, toks["qwen"].add_bos) == (v["qwen"]["<|endoftext|>"], None,
                                                                               False)
    assert toks["starcoder2"].eot_id == v["starcoder2"]["<|endoftext|>"] and not toks["starcoder2"].add_bos
    assert (toks["deepseek"].eot_id, toks["deepseek"].bos_id) == (v["deepseek"]["<｜end▁of▁sentence｜>"],
                                                                  v["deepseek"]["<｜begin▁of▁sentence｜>"])
    assert toks["deepseek"].add_bos and toks["codellama"].add_bos
    assert (toks["codellama"].eot_id, toks["codellama"].bos_id) == (v["codellama"]["</s>"], v["codellama"]["<s>"])
    assert not any(tok.has_sentinels for tok in toks.values())
    # A document: BOS where the family adds one, the text, then the family's end-of-text.
    for family, tok in toks.items():
        head = [tok.bos_id] if family in ("deepseek", "codellama") else []
        assert tok.encode_document("x = 1") == head + tok.encode("x = 1") + [tok.eot_id]


def test_each_format_lays_out_its_model_card_id_for_id(toks):
    v = {family: tok.token_ids for family, tok in toks.items()}
    q, s, d, c = toks["qwen"], toks["starcoder2"], toks["deepseek"], toks["codellama"]
    assert build_infill(q, PRE, SUF, "qwen") == ([v["qwen"]["<|fim_prefix|>"]] + q.encode(PRE)
                                                 + [v["qwen"]["<|fim_suffix|>"]] + q.encode(SUF)
                                                 + [v["qwen"]["<|fim_middle|>"]])
    # The card's prompt, encoded as one text (special tokens recognised), is the same ids.
    assert build_infill(q, PRE, SUF, "qwen") == q.encode(f"<|fim_prefix|>{PRE}<|fim_suffix|>{SUF}<|fim_middle|>")
    assert build_infill(s, PRE, SUF, "starcoder2") == s.encode(f"<fim_prefix>{PRE}<fim_suffix>{SUF}<fim_middle>")
    assert build_infill(d, PRE, SUF, "deepseek") == [v["deepseek"]["<｜begin▁of▁sentence｜>"]] + d.encode(
        f"<｜fim▁begin｜>{PRE}<｜fim▁hole｜>{SUF}<｜fim▁end｜>")
    pre, suf = "def add(a, b):", "return a + b"
    suffix_ids = c.encode_suffix(suf)
    assert c.backend.id_to_token(c.encode(suf)[0]).startswith("▁")  # what encode would have put first
    assert not c.backend.id_to_token(suffix_ids[0]).startswith("▁") and c.decode(suffix_ids) == suf
    bos, pre_id, suf_id, mid_id = (v["codellama"][t] for t in ("<s>", "▁<PRE>", "▁<SUF>", "▁<MID>"))
    assert build_infill(c, pre, suf, "codellama") == [bos, pre_id] + c.encode(pre) + [suf_id] + suffix_ids + [mid_id]
    assert build_infill(c, pre, suf, "codellama-spm") == [bos, pre_id, suf_id] + suffix_ids + [mid_id] + c.encode(pre)


def test_stops_cover_end_of_text_and_every_fim_and_repository_token(toks):
    v = {family: tok.token_ids for family, tok in toks.items()}
    assert set(infill_stop_ids(Specials.of(toks["qwen"]), "qwen")) == {v["qwen"][t] for t in FAMILIES["qwen"][0]}
    assert set(infill_stop_ids(Specials.of(toks["starcoder2"]), "starcoder2")) == {
        v["starcoder2"][t] for t in FAMILIES["starcoder2"][0]}
    assert set(infill_stop_ids(Specials.of(toks["deepseek"]), "deepseek")) == {
        v["deepseek"][t] for t in FAMILIES["deepseek"][0][1:]}
    codellama = Specials.of(toks["codellama"])
    assert infill_stop_ids(codellama, "codellama")[:2] == (v["codellama"]["▁<EOT>"], v["codellama"]["</s>"])
    assert end_id(codellama, "codellama") == v["codellama"]["▁<EOT>"]
    assert end_id(Specials.of(toks["qwen"]), "qwen") == toks["qwen"].eot_id


def test_repository_context_goes_before_the_fim_prompt(toks):
    q, s = toks["qwen"], toks["starcoder2"]
    files = [("utils.py", "def one():\n    return 1\n"), ("main.py", "print(one())\n")]
    assert build_infill(q, PRE, SUF, "qwen", extra_files=files, repo_name="calc") == q.encode(
        "<|repo_name|>calc\n<|file_sep|>utils.py\ndef one():\n    return 1\n\n<|file_sep|>main.py\nprint(one())\n\n"
        f"<|fim_prefix|>{PRE}<|fim_suffix|>{SUF}<|fim_middle|>")
    assert build_infill(s, PRE, SUF, "starcoder2", extra_files=files, repo_name="calc") == s.encode(
        "<repo_name>calc<file_sep>utils.py\ndef one():\n    return 1\n<file_sep>main.py\nprint(one())\n"
        f"<fim_prefix>{PRE}<fim_suffix>{SUF}<fim_middle>")
    # Formats without a repository layout ignore the files.
    assert build_infill(toks["deepseek"], PRE, SUF, "deepseek", extra_files=files) == \
        build_infill(toks["deepseek"], PRE, SUF, "deepseek")


def test_format_detection_by_family_then_tokenizer(toks):
    sentinel_tok = train_tokenizer(CORPUS, vocab_size=400, num_masks=4)
    # CodeGen2.5-like: CodeGen2's sentinels and StarCoder's <fim_*> tokens; the family decides (sentinels).
    both = Specials({**sentinel_tok.token_ids, "<fim_prefix>": 500, "<fim_suffix>": 501, "<fim_middle>": 502},
                    sentinel_tok.eot_id)
    assert detect_format("llama", both) == "codegen2" and detect_format("codegen", both) == "codegen2"
    assert detect_format("qwen2", Specials.of(toks["qwen"])) == "qwen"
    assert detect_format("starcoder2", Specials.of(toks["starcoder2"])) == "starcoder2"
    assert detect_format("llama", Specials.of(toks["deepseek"])) == "deepseek"
    assert detect_format("llama", Specials.of(toks["codellama"])) == "codellama"
    bare = Specials({"<|endoftext|>": 0}, 0)
    assert detect_format("llama", bare) is None
    with pytest.raises(UserError, match="has no infill format") as info:
        resolve_format(None, "llama", bare)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="infill format 'qwen' needs the tokens <\\|fim_prefix\\|>"):
        resolve_format("qwen", "llama", Specials.of(toks["deepseek"]))


def test_codegen2_formats_keep_their_layouts():
    tok = train_tokenizer(CORPUS, vocab_size=400, num_masks=4)
    sp, pre, suf = Specials.of(tok), tok.encode(PRE), tok.encode(SUF)
    m1, m2 = tok.mask_id(1), tok.mask_id(2)
    assert infill_prompt(sp, pre, suf, "codegen2") == pre + [m1] + suf + [tok.eot_id, tok.sep_id, m1]
    assert infill_prompt(sp, pre, suf, "fim") == [m1] + pre + [m2] + suf + [tok.sep_id]
    assert infill_stop_ids(sp, "codegen2") == infill_stop_ids(sp, "fim") == (tok.eom_id, tok.eot_id)
    assert set(FORMATS) == {"codegen2", "fim", "qwen", "starcoder2", "deepseek", "codellama", "codellama-spm"}


def test_family_tokenizer_files_survive_save(toks, tmp_path):
    toks["deepseek"].save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["eos_token"]["content"] == "<｜end▁of▁sentence｜>"
    again = CodeGenTokenizer.load(tmp_path)
    assert (again.eot_id, again.bos_id, again.add_bos) == (toks["deepseek"].eot_id, toks["deepseek"].bos_id, True)


def test_fim_objective_in_the_models_format_round_trips(toks):
    """Without CodeGen2's sentinels the run's infill share becomes FIM in the model's format (span_rate 0); the
    examples follow the registry's layout, keep BOS first and close the middle with the format's end token."""
    import numpy as np

    from codegen2.config import ObjectiveConfig
    from codegen2.data.loader import objective_setup
    from codegen2.objectives import decode_fim, fim_transform, make_example, objective_rng

    cfg, special, note = objective_setup(ObjectiveConfig(span_rate=0.5), toks["codellama"], "llama")
    assert (cfg.span_rate, cfg.fim_rate) == (0.0, 0.5) and "FIM in the model's codellama format" in note
    v = toks["codellama"].token_ids
    assert special.fim == (v["▁<PRE>"], v["▁<SUF>"], v["▁<MID>"]) and special.fim_end == v["▁<EOT>"]
    doc = np.array(toks["codellama"].encode_document("def add(a, b):\n    return a + b\n"))
    for seed in range(20):
        out = fim_transform(doc, objective_rng(seed, 0), special, spm=False)
        assert out[0] == special.bos and out[1] == special.fim[0] and out[-2:].tolist() == [v["▁<EOT>"], v["</s>"]]
        assert decode_fim(out, special).tolist() == doc.tolist()
    qcfg, qspecial, _ = objective_setup(ObjectiveConfig(span_rate=0.0, fim_rate=1.0, prefix_lm=True), toks["qwen"],
                                        "qwen2")
    qdoc = np.array(toks["qwen"].encode_document("x = 1\nprint(x)\n") * 3)
    example = make_example(qdoc[:25], 3, 0, qcfg, qspecial)
    assert example.objective == "fim" and example.input_ids[0] == toks["qwen"].token_ids["<|fim_prefix|>"]
    assert example.input_ids[example.prefix_len - 1] == toks["qwen"].token_ids["<|fim_middle|>"]
    with pytest.raises(UserError, match="has no infill format"):
        objective_setup(ObjectiveConfig(), type("Bare", (), {"has_sentinels": False, "eot_id": 0, "bos_id": None,
                                                            "add_bos": False, "token_ids": {"<|endoftext|>": 0}})(),
                        "llama")


def test_qwen_family_imports_infills_in_its_format_and_exports_its_own_tokenizer(toks, tmp_path):
    """A Qwen2 directory with its own tokenizer: import-hf, infill in the qwen format (detected), export-hf keeps
    the tokenizer files; transformers loads the export with no remote code and tokenizes as we do."""
    transformers = pytest.importorskip("transformers")
    import torch

    from codegen2.generation.sampling import SamplingParams, infill
    from codegen2.hf import export_hf, import_hf
    from codegen2.infill import detect_format
    from codegen2.loading import load_checkpoint

    source = tmp_path / "source"
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)).save_pretrained(source)
    family_tokenizer(source, "qwen")
    run = import_hf(source, tmp_path / "run")
    loaded = load_checkpoint(run)
    fmt = detect_format(loaded.config.arch, Specials.of(loaded.tokenizer))
    assert fmt == "qwen"
    middle = infill(loaded.model, loaded.tokenizer, [PRE], [SUF], SamplingParams(max_new_tokens=5))[0]  # detected
    assert isinstance(middle, str)
    out = export_hf(run, tmp_path / "exported")
    assert json.loads((out / "tokenizer_config.json").read_text()) == FAMILIES["qwen"][1]
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"
    # AutoTokenizer of a qwen2 directory rebuilds the pre-tokenizer with Qwen's own regex (the real tokenizer.json
    # has it; this small BPE has GPT-2's), so the ids are compared through the class that reads the file as it is.
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    card = f"<|fim_prefix|>{PRE}<|fim_suffix|>{SUF}<|fim_middle|>"
    assert hf_tok(card)["input_ids"] == build_infill(loaded.tokenizer, PRE, SUF, "qwen")
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "Qwen2ForCausalLM"


def test_infill_command_uses_the_detected_format_and_refuses_a_model_without_one(toks, tmp_path, capsys):
    """`codegen2 infill` on a Qwen2 directory with its own tokenizer fills in the qwen format (the prompt's token
    count in the context check names it); a tokenizer with no FIM tokens is refused in one line."""
    transformers = pytest.importorskip("transformers")

    from codegen2 import cli

    source = tmp_path / "qwen"
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)).save_pretrained(source)
    family_tokenizer(source, "qwen")
    args = ["infill", "--checkpoint", str(source), "--prefix", PRE, "--suffix", SUF, "--max-new-tokens", "4",
            "--device", "cpu"]
    assert cli.main(args) == 0
    assert cli.main(args + ["--infill-format", "codegen2"]) == 2
    assert "infill format 'codegen2' needs the tokens <mask_1>" in capsys.readouterr().err
    # The same model with a tokenizer that has no FIM tokens at all.
    config = json.loads((source / "tokenizer_config.json").read_text())
    spec = json.loads((source / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] == "<|endoftext|>"]
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items() if "fim" not in k and "|>" not in k
                              or k == "<|endoftext|>"}
    (source / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (source / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "has no infill format" in err and "\n" not in err


def test_training_continues_a_qwen2_directory_with_fim_in_its_format(toks, tiny_config, tmp_path, capsys):
    """`train.init_from` a Qwen2 directory with its own tokenizer (no CodeGen2 sentinels): the run's infill share
    trains as FIM in the qwen format, documents end with its end-of-text, and the loss is finite."""
    import dataclasses

    transformers = pytest.importorskip("transformers")
    import numpy as np

    from codegen2 import from_pretrained
    from codegen2.train import train

    source = tmp_path / "qwen"
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)).save_pretrained(source)
    tok = family_tokenizer(source, "qwen")
    model_cfg = from_pretrained(source, load_tokenizer=False).config
    fields = {f"model.{f.name}": getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)
              if getattr(model_cfg, f.name) is not None}
    config = tiny_config(**fields, **{"tokenizer.vocab_size": 400, "train.init_from": str(source),
                                      "train.max_steps": 2, "train.seq_len": 64, "objective.span_rate": 0.5})
    result = train(config, tmp_path / "run")
    assert "becomes FIM in the model's qwen format: fim_rate 0.5" in capsys.readouterr().out
    assert all(np.isfinite(r["loss"]) for r in result.history)
    assert any("loss_fim" in r for r in result.history)
    assert tok.eot_id == tok.token_ids["<|endoftext|>"]
