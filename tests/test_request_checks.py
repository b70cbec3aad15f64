"""One set of request rules for `codegen2 sample`/`infill` and the server: each bad request is refused by
both, as one line on the command line and as a 400 naming the parameter over HTTP."""

from __future__ import annotations

import gzip
import json

import pytest

from codegen2 import cli
from codegen2.loading import load_checkpoint
from codegen2.serve.protocol import ApiError, parse_request, plan_request
from conftest import make_random_run

N_CTX = 64

# (CLI arguments after --checkpoint, the same request for the API, the API parameter, words of the CLI message)
BAD = [
    (["--prompt", "x", "--max-new-tokens", "100000"], {"prompt": "x", "max_tokens": 100000}, "max_tokens",
     ["--max-new-tokens=100000", "context of 64", "at most"]),
    (["--prompt", "x", "--max-new-tokens", "-5"], {"prompt": "x", "max_tokens": -5}, "max_tokens",
     ["--max-new-tokens=-5", "at least 1"]),
    (["--prompt", "x", "--max-new-tokens", "0"], {"prompt": "x", "max_tokens": 0}, "max_tokens", ["at least 1"]),
    (["--prompt", ""], {"prompt": ""}, "prompt", ["prompt is empty"]),
    (["--prompt", "x", "--top-p", "0"], {"prompt": "x", "top_p": 0.0}, "top_p", ["--top-p=0", "(0, 1]"]),
    (["--prompt", "x", "--top-p", "1.5"], {"prompt": "x", "top_p": 1.5}, "top_p", ["--top-p=1.5"]),
    (["--prompt", "x", "--temperature", "-1"], {"prompt": "x", "temperature": -1.0}, "temperature",
     ["--temperature=-1", "[0, 2]"]),
    (["--prompt", "x", "--temperature", "nan"], {"prompt": "x", "temperature": float("nan")}, "temperature",
     ["--temperature=nan"]),
    (["--prompt", "x", "--stop", ""], {"prompt": "x", "stop": ""}, "stop", ["--stop strings must not be empty"]),
    (["--prompt", "x", "--seed", "-1"], {"prompt": "x", "seed": -1}, "seed", ["--seed=-1"]),
    (["--prompt", "word " * 80], {"prompt": "word " * 80}, "prompt", ["too long for the model context"]),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_tokenizer):
    return make_random_run(tmp_path_factory.mktemp("checks_run"), small_tokenizer, N_CTX)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_checkpoint(run_dir)


def _cli_error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured
    return captured.err


@pytest.mark.parametrize("args, body, param, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_cli_and_server_refuse_the_same_requests(args, body, param, words, run_dir, loaded, capsys):
    message = _cli_error(["sample", "--checkpoint", str(run_dir), *args], capsys)
    assert all(w in message for w in words), message
    with pytest.raises(ApiError) as err:
        plan_request(parse_request(body), loaded.tokenizer, N_CTX, 512)
    assert err.value.status == 400 and err.value.param == param, (err.value.param, err.value.message)


@pytest.mark.parametrize("args, words", [
    (["--prefix", "", "--suffix", ""], ["prefix and the suffix are both empty"]),
    (["--prefix", "def f(", "--suffix", ")", "--max-new-tokens", "100000"], ["--max-new-tokens=100000", "at most"]),
    (["--prefix", "x", "--suffix", "y", "--top-p", "0"], ["--top-p=0"]),
    (["--prefix", "x", "--suffix", "y", "--temperature", "-0.5"], ["--temperature=-0.5"]),
])
def test_infill_refuses_bad_requests_in_one_line(args, words, run_dir, loaded, capsys):
    message = _cli_error(["infill", "--checkpoint", str(run_dir), *args], capsys)
    assert all(w in message for w in words), message
    body = {"prompt": args[1], "suffix": args[3], **({"max_tokens": 100000} if "100000" in args else {}),
            **({"top_p": 0.0} if "--top-p" in args else {}), **({"temperature": -0.5} if "-0.5" in args else {})}
    with pytest.raises(ApiError):
        plan_request(parse_request(body), loaded.tokenizer, N_CTX, 512)


@pytest.mark.parametrize("lines, words", [
    (['{"text": "def f("}'], [":1:", "\"prompt\""]),
    (['{"prompt": "a"}', "not json"], [":2:", "not valid JSON"]),
    (['{"prompt": "a"}', '"just a string"'], [":2:", "expected a JSON object"]),
    (['{"prompt": 3}'], [":1:", "\"prompt\""]),
    ([""], ["no prompts"]),
])
def test_prompt_file_lines_are_checked_naming_the_line(lines, words, run_dir, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    message = _cli_error(["sample", "--checkpoint", str(run_dir), "--prompt-file", str(path)], capsys)
    assert str(path) in message and all(w in message for w in words), message


def test_unreadable_prompt_files_are_one_line_errors(run_dir, tmp_path, capsys):
    """Not UTF-8, missing, or a truncated .gz: the one JSONL reader names the file, never a traceback."""
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 50)[:-12])
    for name, words in (("latin1.jsonl", ["cannot read"]), ("missing.jsonl", ["file not found"]),
                        ("cut.jsonl.gz", ["cannot read"])):
        path = tmp_path / name
        message = _cli_error(["sample", "--checkpoint", str(run_dir), "--prompt-file", str(path)], capsys)
        assert str(path) in message and all(w in message for w in words), message


def test_good_requests_still_run(run_dir, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "def f("}) + "\n\n" + json.dumps({"prompt": "import"}) + "\n")
    # --decoder model: compiling here would spend this process's torch.compile budget that test_serve needs
    assert cli.main(["sample", "--checkpoint", str(run_dir), "--prompt-file", str(path),
                     "--max-new-tokens", "4", "--decoder", "model"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["def f(", "import"]
    assert cli.main(["infill", "--checkpoint", str(run_dir), "--prefix", "", "--suffix", "x",
                     "--max-new-tokens", "4", "--decoder", "model"]) == 0
