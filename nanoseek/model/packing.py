"""Packed projections for inference: q/k/v as one matmul, gate/up as one.

At batch-1 decode every matmul is a GEMV plus Python dispatch, so three small q/k/v matmuls
cost more than one of their stacked weights (vLLM packs them the same way: QKVParallelLinear,
MergedColumnParallelLinear). `pack_projections(model)` stacks the weights once and makes the
original modules' tensors views of the stack, so:
  - memory is unchanged, and nothing in checkpoints, state dicts or module names changes;
  - in-place updates (an optimizer step, load_state_dict) reach the packed matmul;
  - anything that swaps a module or its tensor (LoRA wrapping q_proj, quantize_model, a
    dtype cast) is noticed on the next forward, which then runs the plain modules;
  - with autograd on (training) the plain modules run, so gradients reach their Parameters.
Works for nn.Linear, Int8Linear and Int4Linear (rows and their per-row or per-group scales
stack exactly).
"""

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.quant.layers import Int4Linear, Int8Linear

# the per-row tensors a quantized module holds beside its weight, stacked with it
ROW_TENSORS = {Int8Linear: ("weight_scale",), Int4Linear: ("weight_scale", "weight_min")}


def _tensor(m):
    return m.weight if isinstance(m, nn.Linear) else m.qweight


class Packed:
    """One matmul standing for `modules` (same input; outputs side by side on the last dim).
    Not an nn.Module: it must not appear in parameters() or state_dict(); the modules own the
    tensors, which are views of this one's stacked weight."""

    def __init__(self, modules):
        self.modules = modules
        self.sizes = [m.out_features for m in modules]
        ws = [_tensor(m) for m in modules]
        bias = _cat_bias(modules)
        kind, m0 = type(modules[0]), modules[0]
        rows = ROW_TENSORS.get(kind, ())
        stacked = [torch.cat([w.data for w in ws])] + [torch.cat([getattr(m, r) for m in modules]) for r in rows]
        if kind is Int8Linear:
            self.quant = Int8Linear(*stacked, bias, m0.dynamic, m0.dtype)
        elif kind is Int4Linear:
            self.quant = Int4Linear(*stacked, bias, m0.dtype)
        else:
            self.quant = None
        self.weight, self.bias = (stacked[0], bias) if self.quant is None else (self.quant.qweight, self.quant.bias)
        # the modules' tensors become views of the stack (same Parameter objects: optimizers keep theirs)
        a = 0
        for m, w, n in zip(modules, ws, self.sizes):
            w.data = self.weight[a:a + n]
            for r in rows:
                setattr(m, r, getattr(self.quant, r)[a:a + n])
            if m.bias is not None:
                m.bias.data = self.bias[a:a + n]
            a += n
        self.ptrs = [_tensor(m).data_ptr() for m in modules]

    def valid(self, modules) -> bool:
        """Usable now: no autograd (gradients must reach the modules' own Parameters, so training
        runs the plain modules), and still standing for exactly these modules, whose tensors
        still live in the stack?"""
        return not torch.is_grad_enabled() and all(
            m is p and _tensor(m).data_ptr() == ptr for m, p, ptr in zip(modules, self.modules, self.ptrs))

    def __call__(self, x):
        return self.quant(x) if self.quant is not None else F.linear(x, self.weight, self.bias)


def _cat_bias(modules):
    return None if modules[0].bias is None else torch.cat([m.bias.data for m in modules])


def packable(modules) -> bool:
    kinds = {type(m) for m in modules}
    if len(kinds) != 1 or kinds.pop() not in (nn.Linear, Int8Linear, Int4Linear):
        return False
    w = [_tensor(m) for m in modules]
    same = all(t.dtype == w[0].dtype and t.device == w[0].device and t.shape[1] == w[0].shape[1] for t in w)
    same = same and len({m.bias is None for m in modules}) == 1  # all biased (Qwen2's q/k/v) or none
    if isinstance(modules[0], (Int8Linear, Int4Linear)):
        same = same and all(getattr(m, "dynamic", None) == getattr(modules[0], "dynamic", None)
                            and m.dtype == modules[0].dtype for m in modules)
    if isinstance(modules[0], Int4Linear):  # the same groups along K
        same = same and all(m.weight_scale.shape[1] == modules[0].weight_scale.shape[1] for m in modules)
    return same


@torch.no_grad()
def pack_projections(model) -> int:
    """Pack every GQA layer's q/k/v and every SwiGLU MLP's gate/up (dense layers, routed and
    shared experts), and re-pack those whose modules were swapped since; returns how many.
    Modules that differ in kind, dtype or bias are left as they are. The packed matmuls run only
    without autograd (generation, evaluation)."""
    from nanoseek.model.attention import GQA
    from nanoseek.model.layers import MLP
    count = 0
    for m in model.modules():
        group = ([m.q_proj, m.k_proj, m.v_proj] if isinstance(m, GQA) else
                 [m.gate_proj, m.up_proj] if isinstance(m, MLP) else None)
        if group is not None and (m.packed is None or not m.packed.valid(group)) and packable(group):
            m.packed = Packed(group)
            count += 1
    return count
