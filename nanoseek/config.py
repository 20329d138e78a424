"""The one model config, and the only place Hugging Face field names are mapped.

A ModelConfig describes every model nanoseek runs: Llama / Qwen2 (GQA, dense SwiGLU) and
DeepSeek-V3 (MLA attention, Mixture-of-Experts). `from_hf` reads a transformers
config.json dict; `to_hf` writes one back so transformers (and vLLM) load our checkpoints.
Presets are JSON files in nanoseek/presets/, loaded with `ModelConfig.preset(name)`.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources

from nanoseek.errors import NanoseekError

# architecture string in config.json -> our arch name
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}


@dataclass
class ModelConfig:
    arch: str = "deepseek_v3"          # llama | qwen2 | deepseek_v3 (decides the HF export format)
    vocab_size: int = 32000
    dim: int = 512                      # hidden size
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8                 # GQA groups (ignored by MLA, whose cache is one latent)
    head_dim: int = 64                  # GQA head dim
    inter_dim: int = 1408               # dense SwiGLU hidden size
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    # RoPE. rope_scaling: None or {"type": "yarn"|"linear"|"llama3", "factor": ..., ...}
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = False       # DeepSeek rotates (x0,x1),(x2,x3)..; Llama rotates halves
    # attention
    attn_type: str = "mla"              # gqa | mla
    qkv_bias: bool = False              # Qwen2 has q/k/v biases
    o_bias: bool = False
    # MLA (DeepSeek-V2/V3)
    q_lora_rank: int = 0                # 0: q is one projection (V2-Lite), else low-rank
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE. n_routed_experts == 0 means every layer is dense.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    n_activated_experts: int = 2
    moe_inter_dim: int = 1408
    first_k_dense: int = 0              # the first k layers keep a dense FFN
    score_func: str = "sigmoid"         # softmax | sigmoid
    n_group: int = 1
    topk_group: int = 1
    route_scale: float = 1.0
    norm_topk_prob: bool = True
    moe_bias: bool = True               # DeepSeek-V3's aux-loss-free balancing bias
    # sparse attention (DeepSeek DSA lightning indexer); 0 heads = dense attention everywhere
    index_n_heads: int = 0
    index_head_dim: int = 64
    index_topk: int = 2048
    index_layers: list[int] | None = None  # layers with an indexer; None = all (when index_n_heads > 0)
    # selection granularity: 1 = single keys (DSA as published); b > 1 = blocks of b consecutive
    # keys scored by their mean indexer key (the CPU-fast form, see nanoseek/model/indexer.py)
    index_block_size: int = 1
    # selections per layer: 1 = one for all heads (DSA); g > 1 (GQA, blocks) = each of g groups of
    # KV heads chooses its own blocks with its own head weights (NSA's per-group selection)
    index_groups: int = 1

    def __post_init__(self):
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        checks = [
            (self.arch in ("llama", "qwen2", "deepseek_v3"), "arch", f"unknown arch {self.arch!r}"),
            (self.attn_type in ("gqa", "mla"), "attn_type", f"must be gqa or mla, got {self.attn_type!r}"),
            (self.score_func in ("softmax", "sigmoid"), "score_func", f"must be softmax or sigmoid, got {self.score_func!r}"),
            (self.index_block_size >= 1 and self.index_topk % self.index_block_size == 0, "index_block_size",
             f"{self.index_block_size} must be >= 1 and divide index_topk={self.index_topk}"),
            (self.index_groups == 1 or (self.attn_type == "gqa" and self.index_block_size > 1
                                        and self.index_groups >= 1 and self.n_kv_heads % self.index_groups == 0),
             "index_groups", f"{self.index_groups} must be 1, or divide n_kv_heads={self.n_kv_heads} "
             f"(GQA with index_block_size > 1)"),
            (self.n_heads % max(self.n_kv_heads, 1) == 0, "n_kv_heads", f"{self.n_kv_heads} does not divide n_heads={self.n_heads}"),
            (self.n_routed_experts == 0 or self.n_routed_experts % self.n_group == 0, "n_group",
             f"{self.n_group} does not divide n_routed_experts={self.n_routed_experts}"),
            (self.n_routed_experts == 0 or self.n_activated_experts <= self.n_routed_experts, "n_activated_experts",
             f"{self.n_activated_experts} > n_routed_experts={self.n_routed_experts}"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise NanoseekError(f"model config field {name}: {msg}")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def layer_is_moe(self, i: int) -> bool:
        return self.is_moe and i >= self.first_k_dense

    def layer_has_indexer(self, i: int) -> bool:
        return self.index_n_heads > 0 and (self.index_layers is None or i in self.index_layers)

    @property
    def rope_dim(self) -> int:
        """Number of dims each head rotates."""
        return self.qk_rope_head_dim if self.attn_type == "mla" else self.head_dim

    def num_params(self, active: bool = False) -> int:
        """Parameter count from the config alone (active=True: what one token touches)."""
        d = self.dim
        if self.attn_type == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.n_heads * qk if self.q_lora_rank else d * self.n_heads * qk
            attn = q + d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            attn += self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
            attn += self.n_heads * self.v_head_dim * d
        else:
            attn = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        total = 0
        for i in range(self.n_layers):
            total += attn + 2 * d
            if self.layer_is_moe(i):
                n_exp = self.n_activated_experts if active else self.n_routed_experts
                total += 3 * d * self.moe_inter_dim * (n_exp + self.n_shared_experts) + self.n_routed_experts * d
            else:
                total += 3 * d * self.inter_dim
        emb = self.vocab_size * d
        total += emb + d + (0 if self.tie_embeddings else emb)
        return total

    # ---- presets and (de)serialisation -----------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """Load nanoseek/presets/<name>.json (presets are data, not code paths)."""
        path = resources.files("nanoseek") / "presets" / f"{name}.json"
        if not path.is_file():
            names = sorted(p.name[:-5] for p in (resources.files("nanoseek") / "presets").iterdir() if p.name.endswith(".json"))
            raise NanoseekError(f"unknown preset {name!r} (have: {', '.join(names)})")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NanoseekError(f"model config: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Map a transformers config.json dict to a ModelConfig."""
        archs = hf.get("architectures") or []
        arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if arch is None:
            raise NanoseekError(
                f"{source}: field architectures={archs} is not supported (supported: {', '.join(HF_ARCHITECTURES)})")

        def need(key):
            if key not in hf:
                raise NanoseekError(f"{source}: missing field {key!r}")
            return hf[key]

        n_heads = need("num_attention_heads")
        dim = need("hidden_size")
        # transformers v5 keeps rope settings in rope_parameters; older files use rope_theta + rope_scaling
        rope = dict(hf.get("rope_parameters") or {})
        scaling = dict(hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rtype = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        rope_scaling = None
        if rtype != "default":
            src = rope if rope.get("rope_type") else scaling
            rope_scaling = {k: v for k, v in src.items() if k not in ("rope_theta", "rope_type", "type")}
            rope_scaling["type"] = rtype
            if rtype not in ("yarn", "linear", "llama3"):
                raise NanoseekError(f"{source}: rope type {rtype!r} is not supported (supported: yarn, linear, llama3)")
        eos = hf.get("eos_token_id")
        common = dict(
            arch=arch, vocab_size=need("vocab_size"), dim=dim, n_layers=need("num_hidden_layers"),
            n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            inter_dim=need("intermediate_size"), norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=hf.get("max_position_embeddings", 4096),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=[] if eos is None else eos,
            rope_theta=float(theta), rope_scaling=rope_scaling,
        )
        if hf.get("index_n_heads"):  # DeepSeek-V3.2's sparse attention (any arch, when we wrote it)
            common.update(index_n_heads=hf["index_n_heads"], index_head_dim=hf.get("index_head_dim", 64),
                          index_topk=hf.get("index_topk", 2048), index_layers=hf.get("index_layers"),
                          index_block_size=hf.get("index_block_size", 1), index_groups=hf.get("index_groups", 1))
        if hf.get("hidden_act", "silu") != "silu":
            raise NanoseekError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (silu only)")
        if arch in ("llama", "qwen2"):
            bias = bool(hf.get("attention_bias", False))
            return cls(**common, attn_type="gqa", head_dim=hf.get("head_dim") or dim // n_heads,
                       qkv_bias=bias or arch == "qwen2", o_bias=bias)
        return cls(
            **common, attn_type="mla", rope_interleave=bool(hf.get("rope_interleave", True)),
            q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=need("qk_nope_head_dim"), qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"), qkv_bias=bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)),
            n_routed_experts=hf.get("n_routed_experts") or 0, n_shared_experts=hf.get("n_shared_experts") or 0,
            n_activated_experts=hf.get("num_experts_per_tok") or 1, moe_inter_dim=hf.get("moe_intermediate_size", 0),
            first_k_dense=hf.get("first_k_dense_replace") or 0,
            score_func=hf.get("scoring_func", "sigmoid"), n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1, route_scale=hf.get("routed_scaling_factor", 1.0),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            moe_bias=hf.get("topk_method", "noaux_tc") == "noaux_tc",
        )

    def to_hf(self) -> dict:
        """A transformers config.json dict for this model."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update({k: v for k, v in self.rope_scaling.items() if k != "type"}, rope_type=self.rope_scaling["type"])
        hf = dict(
            vocab_size=self.vocab_size, hidden_size=self.dim, intermediate_size=self.inter_dim,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads, rms_norm_eps=self.norm_eps,
            tie_word_embeddings=self.tie_embeddings, max_position_embeddings=self.max_seq_len,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id[0] if len(self.eos_token_id) == 1 else (self.eos_token_id or None),
            hidden_act="silu", rope_theta=self.rope_theta, rope_parameters=rope, torch_dtype="float32",
        )
        if self.rope_scaling:
            hf["rope_scaling"] = dict(rope)
        if self.index_n_heads:
            hf.update(index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim,
                      index_topk=self.index_topk, index_layers=self.index_layers,
                      index_block_size=self.index_block_size, index_groups=self.index_groups)
        if self.arch in ("llama", "qwen2"):
            if self.attn_type != "gqa" or self.is_moe:
                raise NanoseekError(f"a {self.arch} checkpoint must be dense GQA; save with arch='deepseek_v3'")
            arch_name = "LlamaForCausalLM" if self.arch == "llama" else "Qwen2ForCausalLM"
            hf.update(architectures=[arch_name], model_type=self.arch, head_dim=self.head_dim,
                      attention_bias=self.qkv_bias if self.arch == "llama" else False)
            return hf
        if self.attn_type != "mla":
            raise NanoseekError("a deepseek_v3 checkpoint needs attn_type='mla'")
        # transformers' DeepseekV3 always builds a MoE from layer first_k_dense_replace on, so a
        # dense model is written as first_k_dense_replace = n_layers.
        hf.update(
            architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
            rope_interleave=self.rope_interleave, q_lora_rank=self.q_lora_rank or None,
            kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
            attention_bias=self.qkv_bias, n_routed_experts=max(self.n_routed_experts, 1),
            n_shared_experts=self.n_shared_experts,
            num_experts_per_tok=min(self.n_activated_experts, max(self.n_routed_experts, 1)),
            moe_intermediate_size=self.moe_inter_dim,
            first_k_dense_replace=self.first_k_dense if self.is_moe else self.n_layers,
            scoring_func=self.score_func, n_group=self.n_group, topk_group=self.topk_group,
            routed_scaling_factor=self.route_scale, norm_topk_prob=self.norm_topk_prob,
            topk_method="noaux_tc" if self.moe_bias else "greedy", num_nextn_predict_layers=0,
        )
        return hf
