"""The editor endpoints, replayed with the exact JSON real clients send (each body cites the client's source).

- llama.vscode posts to `/infill` (github.com/ggml-org/llama.vscode, src/llama-server.ts, `createRequestPayload`
  and `defaultRequestParams`; its extra-context chunks are `{text, time, filename}`, src/extra-context.ts) and
  reads `content` (src/completion.ts, `getComplFromContent`), `timings`, `tokens_cached` and
  `generation_settings.n_ctx` (src/statusbar.ts).
- Tabby's `openai/completion` backend posts to `/v1/completions` (github.com/TabbyML/tabby,
  crates/http-api-bindings/src/completion/openai.rs, `CompletionRequest`) and reads SSE `choices[0].text`.

The model is the tiny random CodeGen of test_serve, so texts are gibberish but reproducible: the reference is
`generate_ids` on the prompt the format lays out.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from codegen2.infill import Specials, infill_prompt, infill_stop_ids
from codegen2.loading import load_checkpoint
from codegen2.serve.app import create_app
from codegen2.serve.editors import FIM_WINDOW, fit_infill, parse_infill, plan_infill
from codegen2.serve.engine import BatchEngine
from codegen2.serve.protocol import ApiError
from conftest import make_random_run  # noqa: E402
from test_serve import ThreadServer, reference

pytest.importorskip("uvicorn")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = "tiny-editors"
N_CTX = 256


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, small_tokenizer):
    return load_checkpoint(make_random_run(tmp_path_factory.mktemp("editors_run"), small_tokenizer, N_CTX))


@pytest.fixture(scope="module")
def server(loaded):
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch_size=8, max_queue=16)
    with ThreadServer(create_app(engine, MODEL)) as srv:
        yield srv


def llama_vscode_body(prefix: str, suffix: str, prompt: str, chunks: list[dict], warm_up: bool) -> dict:
    """llama.vscode's `createRequestPayload(noPredict, ...)` with its default settings (n_predict 128,
    t_max_prompt_ms 500, t_max_predict_ms 1000, max_parallel_completions 3, no LoRA, no model name)."""
    if warm_up:
        return {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks,
                "prompt": prompt, "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500,
                "t_max_predict_ms": 1}
    return {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks, "prompt": prompt,
            "n_predict": 128, "n_cmpl": 3, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 1000}


CHUNKS = [{"text": "def helper(x):\n    return x * 2\n", "time": 1733580000000, "filename": "/src/util.py"}]


def test_llama_vscode_warm_up_answers_at_once(server):
    body = llama_vscode_body("", "", "", CHUNKS, warm_up=True)
    r = httpx.post(server.url + "/infill", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["content"] == "" and out["tokens_predicted"] == 0
    assert out["input_extra_dropped"] == 1  # CodeGen2's sentinels have no repository layout
    assert out["generation_settings"]["n_ctx"] == N_CTX and "timings" in out and "tokens_cached" in out


def test_llama_vscode_infill_matches_sampling(server, loaded):
    prefix, suffix, prompt = "def area(r):\n", "\n    return result\n", "    result = "
    body = llama_vscode_body(prefix, suffix, prompt, CHUNKS, warm_up=False)
    body.update(temperature=0.0, n_predict=24)
    r = httpx.post(server.url + "/infill", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    tok = loaded.tokenizer
    sentinels = Specials.of(tok)
    ids = infill_prompt(sentinels, tok.encode(prefix) + tok.encode(prompt), tok.encode(suffix))
    ref = reference(loaded, ids, 24, stop_ids=list(infill_stop_ids(sentinels)))[0]
    assert out["content"] == ref.text
    assert out["tokens_evaluated"] == len(ids)
    assert out["input_extra_dropped"] == 1  # CodeGen2's sentinels have no repository layout
    timings = out["timings"]
    assert timings["prompt_n"] == len(ids) and timings["predicted_n"] == out["tokens_predicted"]
    assert out["tokens_cached"] == len(ids) + out["tokens_predicted"]


def test_infill_stream_is_llama_cpp_shaped(server):
    body = {"input_prefix": "import os\n", "input_suffix": "\n", "prompt": "def ", "n_predict": 16,
            "temperature": 0.0, "stream": True}
    with httpx.stream("POST", server.url + "/infill", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["stop"] is True and all(e["stop"] is False for e in events[:-1])
    streamed = "".join(e["content"] for e in events)
    whole = httpx.post(server.url + "/infill", json={**body, "stream": False}, timeout=60).json()["content"]
    assert streamed == whole


def test_infill_bad_input_is_one_line(server):
    r = httpx.post(server.url + "/infill", json={"input_prefix": 3}, timeout=30)
    assert r.status_code == 400 and "input_prefix" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/infill", json={"input_prefix": "x", "bogus": 1}, timeout=30)
    assert r.status_code == 400 and "bogus" in r.json()["error"]["message"]


def test_tabby_openai_completion_streams_choices_text(server, loaded):
    # Tabby splits its "{prefix}<|FIM|>{suffix}" template and sends this struct with stream: true
    # (TabbyML/tabby crates/http-api-bindings/src/completion/openai.rs; presence_penalty defaults to 0.0 in
    # crates/tabby-inference/src/completion.rs; max_decoding_tokens 64 in crates/tabby-common/src/config.rs).
    prefix, suffix = "def area(r):\n    ", "\n    return result\n"
    body = {"model": MODEL, "prompt": prefix, "suffix": suffix, "max_tokens": 64, "temperature": 0.0,
            "stream": True, "presence_penalty": 0.0}
    text = ""
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            if choice["finish_reason"] is not None:  # where Tabby stops reading
                break
    tok = loaded.tokenizer
    sentinels = Specials.of(tok)
    ids = infill_prompt(sentinels, tok.encode(prefix), tok.encode(suffix))
    assert text == reference(loaded, ids, 64, stop_ids=list(infill_stop_ids(sentinels)))[0].text


def test_tabby_without_fim_marker_sends_null_suffix(server):
    body = {"model": MODEL, "prompt": "import ", "suffix": None, "max_tokens": 8, "temperature": 0.1,
            "stream": True, "presence_penalty": 0.0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert any(line == "data: [DONE]" for line in r.iter_lines())


# ------------------------------------------------------------------------------- the 3:1 rule
def test_fit_keeps_prefix_and_suffix_at_three_to_one_and_fills_the_rest_with_extra_files():
    prefix, suffix, prompt = list(range(5000)), list(range(10_000, 13_000)), [7, 7]
    extra, header = [300, 500, 400], 4  # each file's tokens, oldest first; the layout's header once
    room = 4000
    fitted = fit_infill(prefix, suffix, prompt, extra, header, room)
    window = min(FIM_WINDOW, max(room // 2, room - 1204))  # the extra files leave 2796: the window is capped
    assert fitted.prefix == prefix[-3 * (window // 4):] + prompt  # the end of the prefix, next to the cursor
    assert fitted.suffix == suffix[:window // 4 - len(prompt)]  # the start of the suffix
    assert len(fitted.prefix) - len(prompt) == 3 * (len(fitted.suffix) + len(prompt))
    assert fitted.extra == [0, 1, 2]  # 1204 tokens fit in the 1952 left
    assert fitted.truncated and fitted.extra_dropped == 0

    small = fit_infill(prefix, suffix, prompt, extra, header, 1800)  # window: half the room, 675 + 2 + 223
    assert len(small.prefix) == 675 + 2 and len(small.suffix) == 223
    assert small.extra == [0, 2] and small.extra_dropped == 1  # 896 left: newest first, whole files that fit


def test_fit_keeps_everything_that_fits():
    fitted = fit_infill([1] * 10, [2] * 5, [3], [20], 2, 100)
    assert fitted.prefix == [1] * 10 + [3] and fitted.suffix == [2] * 5 and fitted.extra == [0]
    assert not fitted.truncated and fitted.extra_dropped == 0


def test_fit_long_prefix_and_suffix_with_extra_files_through_the_server(server, loaded):
    tok = loaded.tokenizer
    prefix, suffix = "x = 1\n" * 400, "y = 2\n" * 400
    body = llama_vscode_body(prefix, suffix, "z = ", CHUNKS * 3, warm_up=False)
    body.update(n_predict=8, temperature=0.0)
    out = httpx.post(server.url + "/infill", json=body, timeout=60).json()
    assert out["truncated"] is True and out["tokens_evaluated"] + 8 <= N_CTX
    sentinels = Specials.of(tok)
    overhead = len(infill_prompt(sentinels, [], []))
    fitted = fit_infill(tok.encode(prefix), tok.encode(suffix), tok.encode("z = "), [], 0, N_CTX - 8 - overhead)
    ids = infill_prompt(sentinels, fitted.prefix, fitted.suffix)
    assert out["tokens_evaluated"] == len(ids)
    assert out["content"] == reference(loaded, ids, 8, stop_ids=list(infill_stop_ids(sentinels)))[0].text


def test_continue_legacy_completion_with_its_template(server, loaded):
    # Continue's `openai` provider, autocomplete role: `_legacystreamComplete` posts {model, max_tokens,
    # temperature, top_p, frequency_penalty, presence_penalty, stream, stop, prompt} with the undefined ones left
    # out of the JSON (continuedev/continue core/llm/llms/OpenAI.ts); autocomplete sets temperature 0.01.
    prefix, suffix = "def area(r):\n    ", "\n    return result\n"
    prompt = f"{prefix}<mask_1>{suffix}<|endoftext|><sep><mask_1>"  # docs/editors.md's template
    body = {"model": MODEL, "max_tokens": 12, "temperature": 0.01, "stream": True, "stop": ["\n\n", "<eom>"],
            "prompt": prompt}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines)
    tok = loaded.tokenizer
    sentinels = Specials.of(tok)
    assert tok.encode(prompt) == infill_prompt(sentinels, tok.encode(prefix), tok.encode(suffix))
    assert "<eom>" not in text


def test_a_model_without_an_infill_format_is_a_400():
    with pytest.raises(ApiError) as err:  # detect_format found none
        plan_infill(parse_infill({"input_prefix": "x", "n_predict": 4}), None, 256, None)
    assert err.value.status == 400 and "no infill format" in err.value.message


# ------------------------------------------------------------------- a family with a repository layout
@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A random Qwen2 directory with Qwen2.5-Coder's special tokens, imported; served on loopback."""
    transformers = pytest.importorskip("transformers")
    import torch

    from codegen2.hf import import_hf
    from test_infill_formats import family_tokenizer

    root = tmp_path_factory.mktemp("editors_qwen")
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)).save_pretrained(root / "hf")
    family_tokenizer(root / "hf", "qwen")
    loaded = load_checkpoint(import_hf(root / "hf", root / "run"))
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch_size=4, max_queue=8)
    with ThreadServer(create_app(engine, MODEL)) as srv:
        srv.loaded = loaded
        yield srv


def test_extra_files_in_qwens_repository_layout_and_the_3_to_1_rule(qwen):
    from codegen2.infill import repo_context

    loaded, tok = qwen.loaded, qwen.loaded.tokenizer
    prefix, suffix, prompt = "x = 1\n" * 200, "y = 2\n" * 200, "z = "
    chunks = [{"text": f"def f{i}(a):\n    return a + {i}\n", "time": 1733580000000 + i,
               "filename": f"/src/m{i}.py"} for i in range(3)]
    body = llama_vscode_body(prefix, suffix, prompt, chunks, warm_up=False)
    body.update(n_predict=8, temperature=0.0)
    out = httpx.post(qwen.url + "/infill", json=body, timeout=60).json()
    assert out["truncated"] is True and out["input_extra_dropped"] == 0

    specials, n_ctx = Specials.of(tok), loaded.model.config.n_ctx
    files = [(c["filename"], c["text"]) for c in chunks]
    room = n_ctx - 8 - len(infill_prompt(specials, [], [], "qwen"))
    context = repo_context(specials, "qwen", tok.encode, files)
    window = max(room // 2, room - len(context))
    prefix_ids, suffix_ids, prompt_ids = tok.encode(prefix), tok.encode(suffix), tok.encode(prompt)
    kept_prefix = prefix_ids[-3 * (window // 4):]
    kept_suffix = suffix_ids[:window - 3 * (window // 4) - len(prompt_ids)]
    ids = infill_prompt(specials, kept_prefix + prompt_ids, kept_suffix, "qwen", context)
    assert ids[0] == specials.ids["<|repo_name|>"] and ids.count(specials.ids["<|file_sep|>"]) == 3
    assert out["tokens_evaluated"] == len(ids) <= n_ctx - 8
    ref = reference(loaded, ids, 8, stop_ids=list(infill_stop_ids(specials, "qwen")))[0]
    assert out["content"] == ref.text


def test_tabby_suffix_is_laid_out_in_the_models_format(qwen):
    loaded, tok = qwen.loaded, qwen.loaded.tokenizer
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    body = {"model": MODEL, "prompt": prefix, "suffix": suffix, "max_tokens": 8, "temperature": 0.0,
            "stream": True, "presence_penalty": 0.0}
    with httpx.stream("POST", qwen.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines)
    specials = Specials.of(tok)
    ids = infill_prompt(specials, tok.encode(prefix), tok.encode(suffix), "qwen")
    assert text == reference(loaded, ids, 8, stop_ids=list(infill_stop_ids(specials, "qwen")))[0].text


def test_a_model_without_an_infill_format_answers_400_on_both_endpoints(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from codegen2.hf import import_hf
    from test_infill_formats import CORPUS

    backend = Tokenizer(models.BPE())  # a byte-level BPE with an end-of-text and no fill-in-the-middle tokens
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[AddedToken("<|endoftext|>", special=True)], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path / "hf")
    backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    loaded = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "run"))
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch_size=2, max_queue=4)
    with ThreadServer(create_app(engine, MODEL)) as srv:
        r = httpx.post(srv.url + "/infill", json=llama_vscode_body("a = ", "\n", "", [], warm_up=False), timeout=30)
        assert r.status_code == 400 and "no infill format" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "a = ", "suffix": "\n"}, timeout=30)
        assert r.status_code == 400 and "infill format" in r.json()["error"]["message"]
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "a = ", "max_tokens": 2},
                          timeout=30).status_code == 200


def test_a_client_that_leaves_an_infill_is_counted_and_frees_its_row(tmp_path_factory, small_tokenizer):
    loaded = load_checkpoint(make_random_run(tmp_path_factory.mktemp("editors_long"), small_tokenizer, 4096,
                                             never_ends=True))
    import torch

    with torch.no_grad():
        loaded.model.lm_head.bias[loaded.tokenizer.eom_id] = -1e4  # nor does an infill end
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch_size=2, max_queue=4)
    with ThreadServer(create_app(engine, MODEL)) as srv:
        body = {"input_prefix": "import os\n", "input_suffix": "\n", "n_predict": 4000, "stream": True}
        with httpx.stream("POST", srv.url + "/infill", json=body, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
        with pytest.raises(httpx.ReadTimeout):  # gives up while the row runs
            httpx.post(srv.url + "/infill", json={**body, "stream": False}, timeout=1)
        for _ in range(200):  # bounded: 20 s
            health = httpx.get(srv.url + "/health", timeout=10).json()
            if health["clients_hung_up"] >= 2 and health["active"] == health["waiting"] == 0:
                break
            time.sleep(0.1)
        assert health["clients_hung_up"] >= 2 and health["active"] == health["waiting"] == 0
