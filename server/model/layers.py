"""The building blocks of a Llama-family decoder layer. No kernels live here: each block calls
plain torch ops (or, later, the launchers in `kernels/`), so the model file stays composition.

Blocks call each other through `.forward`: we register no hooks (interventions are steps of the
forward pass, by design), and `nn.Module.__call__` costs about 10 us a call, 270 calls a token:
about 8% of batch-1 decode on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.dense_cpu import CpuDenseKernel, PanelWeight, PreparedDecodeLayer
from server.model.edits import NeuronEdit
from server.model.kv_cache import LayerCache
from server.model.sparsity import LayerSparsity, SparseProjection


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, hidden] float32 residual stream -> float32. Written out: on CPU this is
        # faster than F.rms_norm's fused kernel for one token (19 vs 31 us measured here).
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Linear(nn.Module):
    """y = x W^T (+ b) in the weight's dtype. The one place every projection goes through.

    On CPU, every input goes to our dense kernel (kernels/dense_cpu.py) where it loaded, on a copy
    of the weight in the kernel's panel layout (`parts`: 2 for a fused [gate; up]): it reads the
    half weight once for all rows and beats torch's best GEMM at every row count from 1 to 256
    (benchmarks/cpu_gemm.py), with the same sums as the fused decode layer, so a row gets the same
    numbers on either path.

    Without the kernel (no AVX2/F16C or no compiler), `batched_float32` gives inputs of several
    rows a float32 copy of the weight: on CPU, torch's half-precision GEMM has no batched kernel
    (its time grows linearly with the rows) while float32 GEMM amortises the weight read. The copy
    is prepacked for oneDNN's GEMM where torch has oneDNN (1.2-1.5x MKL at 3-16 rows).
    Every path rounds the result to the weight's dtype, as the half GEMV's own output is, so a row
    gets the same numbers whichever path its batch took, up to float32 summation order.
    """

    BATCHED_MIN_ROWS = 3
    PACKED_ROWS_HINT = 8  # the batch size oneDNN lays the packed weight out for; any size runs

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batched_float32: bool = False,
                 dense_kernel: CpuDenseKernel | None = None, parts: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.batched_float32 = batched_float32
        self.bias_f32 = bias.float().contiguous() if bias is not None else None
        self.dense_kernel = dense_kernel if dense_kernel is not None and dense_kernel.supports(weight, bias) else None
        self.panels: PanelWeight | None = None if self.dense_kernel is None else self.dense_kernel.pack(weight, parts)
        self.weight_f32: torch.Tensor | None = None  # [out, in] float32, or oneDNN's packed layout
        self.weight_f32_packed = batched_float32 and torch.backends.mkldnn.is_available()
        self._derive_float32()

    def _derive_float32(self) -> None:
        if self.weight_f32_packed:
            self.weight_f32 = torch.ops.mkldnn._reorder_linear_weight(self.weight.float(), self.PACKED_ROWS_HINT)
        elif self.batched_float32:
            self.weight_f32 = self.weight.float()

    def refresh(self) -> None:
        """Re-derive the copies of `weight` (the kernel's panels, the float32 copy) after an
        in-place edit of it. The panels are rewritten in place, so the fused decode layers that
        read them follow."""
        if self.panels is not None:
            self.panels.panels.copy_(self.dense_kernel.pack(self.weight, self.panels.parts).panels)
        self._derive_float32()

    def _several_rows(self, x: torch.Tensor) -> bool:
        return x.numel() >= self.BATCHED_MIN_ROWS * x.shape[-1]

    def _batched(self, x: torch.Tensor) -> bool:
        return self.batched_float32 and self._several_rows(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.panels is not None:
            return self.dense_kernel.linear(x, self.panels, self.bias_f32)
        if not self._batched(x):
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1]).float()  # [N, in]
        if self.weight_f32_packed:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.weight_f32, self.bias_f32, "none", [], "")
        else:
            y = self._float32_rows(rows, self.weight_f32, self.bias_f32)
        # row-major in the same copy as the rounding: a strided q sends SDPA to its slow math kernel
        return y.to(self.weight.dtype, memory_format=torch.contiguous_format).view(*x.shape[:-1], -1)

    def forward_swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a fused [gate; up] projection: [..., in] -> [..., out / 2]. The dense
        kernel computes it in its epilogue; elsewhere it is three torch ops on the projection."""
        if self.panels is not None:
            return self.dense_kernel.linear(x, self.panels, self.bias_f32, gate_up=True)
        gate, up = self.forward(x).chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward_columns(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Outputs start:end only (one of a fused projection's parts). For WINA's masked prefill
        only: a half weight on CPU takes a float32 copy of the part per call for several rows (one
        read of the part against a GEMM of many rows; the kernel's panels have no row slices)."""
        weight = self.weight[start:end]
        bias = None if self.bias is None else self.bias[start:end]
        if not (self._several_rows(x) and weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.bfloat16)):
            return F.linear(x.to(weight.dtype), weight, bias)
        rows = x.reshape(-1, x.shape[-1]).float()  # [N, in]
        y = self._float32_rows(rows, weight.float(), None if bias is None else bias.float())
        return y.to(weight.dtype, memory_format=torch.contiguous_format).view(*x.shape[:-1], -1)

    @staticmethod
    def _float32_rows(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # rows: [N, in] float32 -> [N, out], column-major: W @ x^T (weight-major) runs 2-4x faster
        # than x @ W^T in MKL for few rows.
        y = torch.mm(weight, rows.t()).t()
        return y if bias is None else y + bias


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_len, in the rotate-half (transformers) layout."""

    def __init__(self, inv_freq: torch.Tensor, scale: float, max_len: int) -> None:
        super().__init__()
        positions = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float())  # [max_len, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        # sin with the sign of rotate-half folded in: rotate_half(x) * sin == x[swapped] * signed_sin
        half = emb.shape[-1] // 2
        sign = torch.cat((-torch.ones(half), torch.ones(half)))
        self.register_buffer("signed_sin", emb.sin() * scale * sign, persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [B, T] -> cos, signed sin: [B, T, 1, head_dim], computed once per forward
        return self.cos[positions].unsqueeze(2), self.signed_sin[positions].unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # x: [B, T, heads, head_dim] -> float32, rotated
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, x.roll(half, dims=-1), signed_sin)


class Attention(nn.Module):
    def __init__(
        self, qkv: Linear, o_proj: Linear, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> None:
        super().__init__()
        self.qkv = qkv  # fused [q; k; v] rows
        self.o_proj = o_proj
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # set by LlamaDecoder.attach_sparsity when a WINA profile is loaded
        self.sparse_qkv: SparseProjection | None = None
        self.sparse_o: SparseProjection | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        sparsity: LayerSparsity | None = None,
    ) -> torch.Tensor:
        # x: [B, T, hidden]; rope: cos/sin tables [B, T, 1, D]; attn_mask: [B, 1, T, S] bool, or
        # None when is_causal says whether plain causal masking (keys from 0) or none is right.
        B, T, _ = x.shape
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        if sparsity is None:
            qkv = self.qkv.forward(x)
        else:
            qkv = sparsity.apply(self.sparse_qkv, x, self.qkv.forward)
        qkv = qkv.view(B, T, H + 2 * KVH, D)
        qk = apply_rope(qkv[:, :, : H + KVH].float(), *rope)  # q and k heads rotated together
        keys, values = cache.write_and_read(qk[:, :, H:], qkv[:, :, H + KVH :])  # [B, KVH, S, D]
        if keys.device.type == "cpu" and keys.dtype != torch.float32:
            # torch's attention over half keys is 5x slower on CPU: this chunk reads float32 copies
            keys, values = keys.float(), values.float()
        q = qk[:, :, :H].to(keys.dtype)
        if T == 1:
            # Decode: each KV head's G query heads form the "query" axis of one SDPA call, so no
            # head is repeated and no GQA expansion runs.
            out = F.scaled_dot_product_attention(
                q.view(B, KVH, H // KVH, D), keys, values,
                attn_mask=None if attn_mask is None else attn_mask.view(B, 1, 1, -1),
            )  # [B, KVH, G, D]
            return self.project_output(out.reshape(B, 1, H * D), sparsity)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=attn_mask, is_causal=is_causal,
            enable_gqa=H != KVH,
        )  # [B, H, T, D]
        return self.project_output(out.transpose(1, 2).reshape(B, T, H * D), sparsity)

    def project_output(self, out: torch.Tensor, sparsity: LayerSparsity | None) -> torch.Tensor:
        if sparsity is None:
            return self.o_proj.forward(out)
        return sparsity.apply(self.sparse_o, out, self.o_proj.forward)


class SwiGLU(nn.Module):
    def __init__(self, gate_up: Linear, down: Linear) -> None:
        super().__init__()
        self.gate_up = gate_up  # fused [gate; up] rows
        self.down = down
        self.sparse_gate_up: SparseProjection | None = None  # set by LlamaDecoder.attach_sparsity
        self.sparse_down: SparseProjection | None = None

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_up.forward_swiglu(x)  # [B, T, intermediate]

    def forward(self, x: torch.Tensor, sparsity: LayerSparsity | None = None,
                neurons: NeuronEdit | None = None) -> torch.Tensor:
        if sparsity is None and neurons is None:
            return self.down.forward(self.activation(x))  # [B, T, hidden]
        if sparsity is None:
            hidden = self.activation(x)  # [B, T, intermediate]
        else:
            hidden = sparsity.apply(self.sparse_gate_up, x, self.activation)
        if neurons is not None:
            hidden = neurons.hidden(hidden)
        out = self.down.forward(hidden) if sparsity is None else sparsity.apply(self.sparse_down, hidden, self.down.forward)
        return out if neurons is None else neurons.output(hidden, out)


class DecoderLayer(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm, mlp: SwiGLU) -> None:
        super().__init__()
        self.attn_norm = attn_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp

    def forward(self, h, rope, cache, attn_mask, is_causal, sparsity: LayerSparsity | None = None,
                neurons: NeuronEdit | None = None):
        # h: [B, T, hidden] float32 residual stream; the adds promote the projections to float32
        h = h + self.attn.forward(self.attn_norm.forward(h), rope, cache, attn_mask, is_causal, sparsity)
        return h + self.mlp.forward(self.mlp_norm.forward(h), sparsity, neurons)

    def forward_decode(self, kernel: PreparedDecodeLayer, h: torch.Tensor, keys: torch.Tensor,
                       values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                       sparsity: LayerSparsity | None, neurons: NeuronEdit | None) -> torch.Tensor:
        """A decode step (one new token per row) on CPU where some row is sparse or edits neurons:
        the projections as in forward, the norms and attention in the decode kernel's parts. A row
        that asks for neither gets exactly what the whole-layer kernel call gives it (no cross-talk).
        h: [B, 1, hidden] float32 contiguous; keys, values: this layer's cache; slots, positions: [B]
        int64."""
        attn = self.attn
        x = kernel.norm(h, kernel.ATTENTION_NORM)
        qkv = attn.qkv.forward(x) if sparsity is None else sparsity.apply(attn.sparse_qkv, x, attn.qkv.forward)
        h = h + attn.project_output(kernel.attend(qkv, keys, values, slots, positions), sparsity)
        return h + self.mlp.forward(kernel.norm(h, kernel.MLP_NORM), sparsity, neurons)
