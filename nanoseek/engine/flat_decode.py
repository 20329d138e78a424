"""Decode steps of a dense GQA model as one flat loop over plain tensors (no nn.Module dispatch).

Why: at batch-1 decode on a CPU the matmuls are a minority of a token's time, and a 30-layer
model's nn.Module calls, attribute lookups and per-call checks are a measurable part of the rest
(SmolLM2-135M int4, one thread: ~11.7 ms a token this way against ~13.6 through the modules;
bench/decode_parts.py). llama.cpp has no such layer. `FlatDecoder` reads the tensors a decode step
needs out of the modules once (the same tensors: in-place weight updates reach it) and runs
Block.forward's math op for op, so the hidden states are bit-identical to the modules'
(tests/test_flat_decode.py).

It applies to dense GQA models (Llama, Qwen2, SmolLM2): every layer GQA with packed q/k/v
(model/packing.py) and a SwiGLU MLP with packed gate/up, no indexer, projections that are
nn.Linear, weight-only Int8Linear or Int4Linear. `current()` checks each step that the modules are
still the ones it read (a LoRA wrap, quantize_model or a dtype cast replaces them) and that no
forward hook wants to see them run; otherwise the engine runs the modules.

Where it can, a step goes on to the compiled form of this loop (csrc/decode.cpp via native.py:
the same matmul kernels, the small ops as C++ loops, the paged cache attended in place), which
agrees with this one up to the order of float sums: every decode step, and steps with prompts
whose rows see at most NATIVE_PROMPT_KEYS keys (the engine gives this decoder steps with prompts
only then; the modules run the others).
"""

import operator
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module

from nanoseek import hardware
from nanoseek.engine import native
from nanoseek.engine.paged_attention import PagedAttention
from nanoseek.model.attention import GQA
from nanoseek.model.layers import MLP, RMSNorm, apply_rope
from nanoseek.quant import int4, int8
from nanoseek.quant.layers import Int4Linear, Int8Linear

NATIVE_HEAD_DIMS = (8, 16, 32, 64, 128)  # the head sizes csrc/decode.cpp's attention is compiled for
# bf16 weights are given to the compiled loop in oneDNN's blocked layout (a second copy of each, made
# once) when the copies take at most this much and the CPU can hold them; NANOSEEK_PREPACK=1 or 0
# decides the size question regardless
PREPACK_MAX_BYTES = 2 << 30
# prompt rows go to the compiled loop while the longest sees at most this many keys: its attention
# reads a row's keys once per row (O(T^2) at a larger constant than SDPA's flash kernel, which the
# modules run for prompts). Measured here (SmolLM2, bf16, 2 threads, one step, compiled against
# modules): 32 prompts of 128 tokens 2.5-2.7 s against 3.1-3.4; 8 of 512 2.9 against 3.9; 5 of 768
# 3.2 against 3.4; one of 512 0.51 against 0.50, of 1,000 1.09 against 1.02, of 2,000 3.2 against 2.7.
NATIVE_PROMPT_KEYS = 512


def _prepack_wanted(weights) -> bool:
    # oneDNN keeps a bf16 blocked layout only where it has bf16 kernels for this CPU (AVX-512, AMX or
    # AVX-NE-CONVERT); on an AVX2-only CPU _reorder_linear_weight raises
    if not hardware.bf16_fast("cpu"):
        return False
    flag = os.environ.get("NANOSEEK_PREPACK")
    if flag is not None:
        return flag != "0"
    return sum(w.numel() * w.element_size() for w in weights) <= PREPACK_MAX_BYTES


_VERSION = operator.attrgetter("_version")  # for tensors known to keep one (the per-step check)


def _version(t) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor keeps no version: it cannot be told apart when changed
        return None


def _matmul(m):
    """A projection (nn.Linear, Int8Linear, Int4Linear, or a Packed stack of them) -> (fn(x [M, K])
    computing what its forward computes with the same ops, its native form or None); None for any
    other module. The native form is (kind, [weight, bias, scale], group, dtype): what
    csrc/decode.cpp's Proj runs, for activations of that dtype (None: any float dtype)."""
    quant = m if isinstance(m, nn.Module) else m.quant  # a Packed stands for its stack (quant None: float)
    empty = torch.empty(0)
    if quant is None or type(quant) is nn.Linear:
        w, b = (m.weight, m.bias) if quant is None else (quant.weight, quant.bias)
        return (lambda x: F.linear(x, w, b)), (0, [w, empty if b is None else b, empty], 0, w.dtype)
    if type(quant) is Int8Linear and not quant.dynamic:
        q, scale, bias = quant.qweight, quant.weight_scale, quant.bias
        s16 = scale.view(-1).to(torch.bfloat16)  # converted once, not every call

        def int8_mm(x):
            y = int8.weight_only_mm(x, q, scale, s16)
            return y if bias is None else y + bias
        native = (1, [q, empty if bias is None else bias, scale.view(-1)], 0, None)
        return int8_mm, native
    if type(quant) is Int4Linear:
        q, scale, lo, bias = quant.qweight, quant.weight_scale, quant.weight_min, quant.bias
        kernel = quant.kernel(torch.zeros(1, quant.in_features, dtype=quant.dtype, device=q.device))  # built once

        def int4_mm(x):
            y = int4.weight_only_mm(x, q, scale, lo, kernel if x.dtype == quant.dtype else quant.kernel(x))
            return y if bias is None else y + bias
        native = None if kernel is None else (
            2, [kernel[0], empty if bias is None else bias, kernel[1]], quant.in_features // scale.shape[1], quant.dtype)
        return int4_mm, native
    return None


class FlatDecoder:
    """The model's hidden_states for decode steps, as a flat loop; build with `FlatDecoder.of(model)`
    (None where the model is not one it can run)."""

    def __init__(self, model, layers):
        self.model, self.layers = model, layers
        self.natives = {}  # activation dtype -> the compiled loop over these layers (None: not for it)
        # bf16 weights the compiled loop holds in oneDNN's layout, and their versions when copied: an
        # in-place update (an optimizer step between RL rollouts, load_state_dict) makes the copies stale
        self.prepacked, self.prepacked_versions, self.head = [], (), None
        self.ran_native = False  # did the last hidden_states() run the compiled loop (logits() may use its head)
        self.has_int4 = any(nat is not None and nat[0] == 2 for *_, nats in layers for nat in nats)
        # what current() re-checks every step, as plain dict lookups (nn.Module.__getattr__ would
        # cost more than the loop saves): the module tree under each layer is the same objects, every
        # parameter and buffer is the same tensor in the same storage, the packed stacks are the
        # ones read, and no module the modules' forward would call has a hook
        edges, tensors, self.hooks = [(model._modules, "layers", model.layers)], [], []
        for i, (blk, attn, mlp, pqkv, pgu, *_) in enumerate(layers):
            edges += [(model.layers._modules, str(i), blk), (attn.__dict__, "packed", pqkv), (mlp.__dict__, "packed", pgu)]
            for m in blk.modules():
                edges += [(m._modules, name, child) for name, child in m._modules.items()]
                tensors += [(d, name, t) for d in (m._parameters, m._buffers) for name, t in d.items() if t is not None]
            self.hooks += [d for m in (blk, attn, mlp, blk.input_layernorm, blk.post_attention_layernorm,
                                       attn.o_proj, mlp.down_proj) for d in (m._forward_hooks, m._forward_pre_hooks)]
        # as parallel lists, for current()'s map()s: each dict must still hold its object under that name
        self.dicts, self.names, self.objects = (list(col) for col in zip(*edges, *tensors))
        self.tensor_objects = [t for _, _, t in tensors]
        self.pointers = tuple(t.data_ptr() for t in self.tensor_objects)

    @classmethod
    def of(cls, model) -> "FlatDecoder | None":
        if getattr(model, "layers", None) is None or not len(model.layers):
            return None
        layers = []
        for blk in model.layers:
            attn, mlp = blk.self_attn, blk.mlp
            if not (type(attn) is GQA and attn.indexer is None and type(mlp) is MLP and attn.packed is not None
                    and mlp.packed is not None and type(blk.input_layernorm) is RMSNorm
                    and type(blk.post_attention_layernorm) is RMSNorm
                    and attn.packed.valid((attn.q_proj, attn.k_proj, attn.v_proj))
                    and mlp.packed.valid((mlp.gate_proj, mlp.up_proj))):
                return None
            mms = [_matmul(m) for m in (attn.packed, attn.o_proj, mlp.packed, mlp.down_proj)]
            if any(mm is None for mm in mms):
                return None
            layers.append((blk, attn, mlp, attn.packed, mlp.packed, attn.o_proj, mlp.down_proj,
                           [fn for fn, _ in mms], [nat for _, nat in mms]))
        return cls(model, layers)

    def current(self) -> bool:
        """Still the modules and tensors it read, with nothing that wants to see the modules run?"""
        if torch.is_grad_enabled() or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return False
        # map() over C functions: a Python generator here cost ~0.3-0.8 ms a token, 5-10% of one
        return (len(self.model.layers) == len(self.layers) and not any(self.hooks)
                and all(map(operator.is_, map(dict.get, self.dicts, self.names), self.objects))
                and tuple(map(torch.Tensor.data_ptr, self.tensor_objects)) == self.pointers)

    def hidden_states(self, input_ids, positions, cache):
        """model.hidden_states(input_ids, positions, cache): the compiled loop where it can run this
        step, else the same ops as the modules in the same order."""
        model = self.model
        x = model.embed_tokens(input_ids)
        cos, sin = model.rope(positions, x.dtype)
        B, T, dim = x.shape
        nat = self._native(x.dtype, T, cache)
        self.ran_native = nat is not None
        if nat is not None:
            store = cache.cache
            tables, lens = cache.row_tables()
            return nat.step(x[0], cos[0], sin[0], store.k, store.v, cache.slots, tables, lens,
                            model.norm.weight, model.norm.eps)[None]
        for blk, attn, mlp, _, _, _, _, (qkv_mm, o_mm, gu_mm, down_mm), _ in self.layers:
            H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
            h = _rms_norm(x, blk.input_layernorm)
            qkv = qkv_mm(h.reshape(-1, dim)).view(B, T, H + 2 * Hkv, D)
            qk = apply_rope(qkv[:, :, :H + Hkv], cos, sin, attn.interleaved)
            out = cache.attend(attn.layer_id, qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:], attn.scale, D)
            x = x + o_mm(out.reshape(B * T, -1)).view(B, T, dim)
            h = _rms_norm(x, blk.post_attention_layernorm).reshape(-1, dim)
            gate, up = gu_mm(h).chunk(2, dim=-1)
            x = x + down_mm(F.silu(gate) * up).view(B, T, dim)
        return _rms_norm(x, model.norm)

    def compiled(self, dtype, rows, cache) -> bool:
        """Does the compiled loop take this step? (The engine hands steps with prompts to this
        decoder only then; otherwise the modules run them, whose FFN goes in slices.)"""
        return self._native(dtype, rows, cache) is not None

    def _native(self, dtype, rows, cache):
        """The compiled loop (csrc/decode.cpp) for a step of `rows` tokens, or None: it runs any step
        over the paged cache (decodes, whole prompts, later chunks of a prompt, a mix: every row
        attends to its sequence's cached keys up to its own position) whose prompt rows see at most
        NATIVE_PROMPT_KEYS keys, in fp32 or bf16, with rows the int4 kernel takes, and leaves a
        prefix all decoding sequences share to the cascade attention (paged_attention.py), which
        reads it once for all."""
        if not (isinstance(cache, PagedAttention) and not cache.shared and cache.cache.k[0].device.type == "cpu"
                and dtype in (torch.float32, torch.bfloat16) and cache.cache.k[0].dtype == dtype
                and not (self.has_int4 and rows > int4.KERNEL_MAX_M)
                and max((cached + new for _, new, cached, _ in cache.prefills), default=0) <= NATIVE_PROMPT_KEYS):
            return None
        if self.prepacked and tuple(map(_VERSION, self.prepacked)) != self.prepacked_versions:
            self.natives.clear()  # a packed copy is stale: copy again
        if dtype not in self.natives:
            self.natives[dtype] = self._build_native(dtype)
        return self.natives[dtype]

    def logits(self, h):
        """model.logits(h), by the prepacked copy of the head where the last native build made one
        (the same oneDNN matmul, without reordering 49152 x 576 weights every step)."""
        if self.head is None or not self.ran_native or h.dtype != torch.bfloat16:
            return self.model.logits(h)
        module, weight, packed = self.head
        if not (self.model.lm_head is module and module.weight is weight):  # swapped since (quantize_model)
            return self.model.logits(h)
        return torch.ops.mkldnn._linear_pointwise(h, packed, module.bias, "none", [], "").float()

    def _build_native(self, dtype):
        mod = native.module()
        first = self.layers[0][1]
        if mod is None or first.head_dim not in NATIVE_HEAD_DIMS:
            return None
        shape = (first.n_heads, first.n_kv_heads, first.head_dim, first.scale, first.interleaved)
        dec = mod.Decoder(shape[0], shape[1], shape[2], float(shape[3]), bool(shape[4]))
        norms = [self.model.norm] + [n for blk, *_ in self.layers for n in (blk.input_layernorm, blk.post_attention_layernorm)]
        if any(n.weight.dtype != dtype or not n.weight.is_contiguous() for n in norms):
            return None
        if dtype == torch.bfloat16:
            head = self.model.lm_head
            float_ws = [nat[1][0] for *_, nats in self.layers for nat in nats if nat is not None and nat[0] == 0]
            head_ok = type(head) is nn.Linear and head.weight.dtype == dtype
            sources = [w for w in float_ws + ([head.weight] if head_ok else []) if w.dtype == dtype]
            self.prepacked = sources if sources and _prepack_wanted(sources) and None not in map(_version, sources) else []
            self.prepacked_versions = tuple(map(_version, self.prepacked))
            packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(w) for w in self.prepacked}
            self.head = (head, head.weight, packed[id(head.weight)]) if head_ok and id(head.weight) in packed else None
        else:
            packed = {}
        for blk, attn, mlp, *_, nats in self.layers:
            if (attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.scale, attn.interleaved) != shape:
                return None
            parts, kinds, groups, pack_max = [], [], [], []
            for nat in nats:
                if nat is None or nat[3] not in (None, dtype):
                    return None
                kind, (w, b, scale), group, _ = nat
                if b.numel() and b.dtype != dtype:
                    return None
                if kind == 0 and id(w) in packed:
                    kind, w = 3, packed[id(w)]  # the same matmul, on oneDNN's copy
                if kind == 1:  # what int8.weight_only_mm multiplies by, in its matmul dtype
                    scale = scale.to(hardware.matmul_dtype(dtype))
                parts.append([w, b, scale])
                kinds.append(kind)
                groups.append(group)
                # rows up to which int8.weight_only_mm would run the packed kernel here (0: never)
                packed_ok = (kind == 1 and dtype == torch.bfloat16 and w.shape[1] % int8.PACK_K_MULTIPLE == 0
                             and w.data_ptr() % int8.ALIGN == 0)
                pack_max.append(int8.PACK_MAX_M if packed_ok else 0)
            dec.add_layer(blk.input_layernorm.weight, blk.input_layernorm.eps, blk.post_attention_layernorm.weight,
                          blk.post_attention_layernorm.eps, *parts, kinds, groups, pack_max)
        return dec


def _rms_norm(x, norm: RMSNorm):
    # RMSNorm.forward's math, without the module call
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).to(x.dtype)
