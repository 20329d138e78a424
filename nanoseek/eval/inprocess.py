"""The in-process backend for evals: requests go straight into nanoseek's engine."""

from nanoseek.engine import LLM
from nanoseek.eval.runner import GenRequest
from nanoseek.sampling import SamplingParams


class EngineGenerator:
    def __init__(self, llm: LLM, name: str):
        self.llm, self.model = llm, name

    def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        tok = self.llm.tokenizer
        prompts = [tok.apply_chat_template(r.messages) if r.messages is not None else r.prompt for r in requests]
        params = [SamplingParams(n=r.n, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                                 stop=list(r.stop), seed=r.seed) for r in requests]
        outs = self.llm.generate(prompts, params)
        return [[c.text for c in o.outputs] for o in outs]


def make_inprocess_generator(model_path, precision: str = "bf16") -> EngineGenerator:
    llm = LLM(model_path, precision=precision)
    return EngineGenerator(llm, str(model_path or "SmolLM2-135M-Instruct"))
