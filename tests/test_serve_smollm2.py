"""The real thing: `python -m nanoseek.serve` with no --model_path serves the embedded
SmolLM2-135M-Instruct, and the official openai client chats with it (slow: loads 135M params)."""

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.test_serve_helpers import ROOT, free_port


@pytest.mark.slow
def test_default_model_answers_through_openai_client(tmp_path):
    from nanoseek.checkpoint.hub import default_model_path
    if not default_model_path().is_file():
        pytest.skip(f"default model not pulled ({default_model_path()}); run `nanoseek pull`")
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.serve", "--port", str(port), "--kv-cache-gib", "0.1",
                             "--max-batch-tokens", "1024"], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        (model,) = [m.id for m in client.models.list().data]
        assert model == "SmolLM2-135M-Instruct"
        msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
        answer = r.choices[0].message.content
        assert "Paris" in answer, answer
        assert r.usage.prompt_tokens > 20 and 0 < r.usage.completion_tokens <= 12
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=msgs, max_tokens=12, temperature=0, stream=True) if c.choices)
        assert streamed == answer
        r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
        assert "Paris" in r.choices[0].text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM), log.read_text()
