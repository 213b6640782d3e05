"""Our Llama-family decoder: composition of the blocks in `layers.py` over a slot KV cache."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from server.model.config import ModelConfig
from server.model.edits import ForwardEdits
from server.model.kv_cache import KVCache
from server.model.layers import Attention, DecoderLayer, Linear, RMSNorm, RotaryEmbedding, SwiGLU
from server.model.sparsity import (
    CPU_KERNEL_MAX_ROWS, DOWN_COLUMNS, GATE_UP_COLUMNS, O_COLUMNS, QKV_COLUMNS, GpuKernel, SparseProjection,
    SparsityPlan, WinaTable,
)
from kernels.dense_cpu import CpuDenseKernel, PreparedDecodeLayer, PreparedDecodeStack
from kernels.wina_cpu import CpuWinaKernel

logger = logging.getLogger(__name__)


def _stack_tables(sparsity: SparsityPlan | None) -> tuple:
    """PreparedDecodeStack's (thresholds_ptr, kept_ptr, sparse_rows) for a plan, or a dense step's."""
    if sparsity is None:
        return None, None, None
    return sparsity.thresholds.data_ptr(), sparsity.kept.data_ptr(), sparsity.sparse_rows


class LlamaDecoder(nn.Module):
    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device, max_model_len: int, dense_kernel: CpuDenseKernel | None = None,
                 kv_dtype: torch.dtype | None = None) -> None:
        """dense_kernel: the CPU kernel (CpuDenseKernel.load()) that runs decode steps and short
        prompt chunks one fused call per layer, and every projection; None runs all in torch.
        kv_dtype: the KV cache's dtype, None for the default (see the kv_dtype property)."""
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.device = device
        self.max_model_len = max_model_len
        self.dense_kernel = dense_kernel if device.type == "cpu" else None
        self._kv_dtype = kv_dtype

        def weight(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise ValueError(f"checkpoint has no tensor {name!r}")
            return state_dict[name].to(device=device, dtype=dtype)

        def optional(name: str) -> torch.Tensor | None:
            return weight(name) if name in state_dict else None

        c = config
        # Without the CPU kernel, half weights on CPU keep a float32 copy for batched rows (see Linear).
        batched = device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and dense_kernel is None

        def linear(w: torch.Tensor, b: torch.Tensor | None, parts: int = 1) -> Linear:
            return Linear(w, b, batched_float32=batched, dense_kernel=self.dense_kernel, parts=parts)

        layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            # Re-laid once: q/k/v fused into one [qkv_size, hidden] weight, gate/up into [2I, hidden].
            qkv_w = torch.cat([weight(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            qkv_b = None
            if c.attention_bias:
                qkv_b = torch.cat([weight(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            attn = Attention(
                linear(qkv_w, qkv_b),
                linear(weight(p + "self_attn.o_proj.weight"), optional(p + "self_attn.o_proj.bias")),
                c.num_heads, c.num_kv_heads, c.head_dim,
            )
            gate_up_w = torch.cat([weight(p + "mlp.gate_proj.weight"), weight(p + "mlp.up_proj.weight")])
            gate_up_b = None
            if c.mlp_bias:
                gate_up_b = torch.cat([weight(p + "mlp.gate_proj.bias"), weight(p + "mlp.up_proj.bias")])
            mlp = SwiGLU(
                linear(gate_up_w, gate_up_b, parts=2),
                linear(weight(p + "mlp.down_proj.weight"), optional(p + "mlp.down_proj.bias")),
            )
            layers.append(DecoderLayer(self._norm(state_dict, p + "input_layernorm.weight"), attn,
                                       self._norm(state_dict, p + "post_attention_layernorm.weight"), mlp))
        self.layers = nn.ModuleList(layers)
        self.embed = nn.Parameter(weight("model.embed_tokens.weight"), requires_grad=False)  # [V, hidden]
        self.norm = self._norm(state_dict, "model.norm.weight")
        if c.tie_word_embeddings or "lm_head.weight" not in state_dict:
            self.head = linear(self.embed.data, None)  # shares the embedding; never edited in place
        else:
            self.head = linear(weight("lm_head.weight"), None)
        inv_freq, scale = c.rope_inv_freq(max_model_len)
        self.rope = RotaryEmbedding(inv_freq, scale, max_model_len).to(device)
        # decode steps run each layer as one kernel call where they can (see forward)
        self.decode_layers: list[PreparedDecodeLayer] | None = None
        self.decode_stack: PreparedDecodeStack | None = None  # the same layers in one call per step
        if self.dense_kernel is not None:
            try:
                self.decode_layers = [self._prepare_decode_layer(self.dense_kernel, layer) for layer in self.layers]
                self.decode_stack = self.dense_kernel.prepare_decode_stack(self.decode_layers)
            except ValueError as error:  # a shape the kernel does not take: torch runs every step
                logger.warning("CPU decode kernel not used for this model: %s", error)
        self.wina: WinaTable | None = None
        q, kv, hidden, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
        # per projection (q, k, v, o, gate, up, down): output width N_p and input width K_p
        self._proj_out = torch.tensor([q, kv, kv, hidden, inter, inter, hidden], dtype=torch.float32, device=device)
        self._layer_weight_total = float(hidden * (q + 2 * kv + 2 * inter) + q * hidden + inter * hidden)

    def attach_sparsity(self, table: WinaTable, cpu_kernel: CpuWinaKernel | None,
                        gpu_kernel: GpuKernel = "tile") -> None:
        """Prepare every projection for WINA sparsity with `table`'s criterion and thresholds. The
        CPU kernel keeps a transposed copy of each weight (one more copy of the model's weights);
        on CUDA, `gpu_kernel` names the Triton path that runs the sparse rows."""
        if table.thresholds.shape[1] != self.config.num_layers:
            raise ValueError(f"WINA profile has {table.thresholds.shape[1]} layers, the model {self.config.num_layers}")
        c = self.config
        q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        sparse = partial(SparseProjection, criterion=table.criterion, cpu_kernel=cpu_kernel, gpu_kernel=gpu_kernel)
        for layer in self.layers:
            attn, mlp = layer.attn, layer.mlp
            attn.sparse_qkv = sparse(attn.qkv, (q, kv, kv), QKV_COLUMNS)
            attn.sparse_o = sparse(attn.o_proj, (c.hidden_size,), O_COLUMNS)
            mlp.sparse_gate_up = sparse(mlp.gate_up, (inter, inter), GATE_UP_COLUMNS, gate_up=True)
            mlp.sparse_down = sparse(mlp.down, (c.hidden_size,), DOWN_COLUMNS)
        self.wina = WinaTable(table.criterion, table.levels.to(self.device), table.thresholds.to(self.device))
        for fused, layer in zip(self.decode_layers or [], self.layers):
            fused.clear_sparsity()  # a previous profile's factors must not outlive it
            if cpu_kernel is not None:
                attn, mlp = layer.attn, layer.mlp
                parts = [attn.sparse_qkv.prepared, attn.sparse_o.prepared, mlp.sparse_gate_up.prepared,
                         mlp.sparse_down.prepared]
                if all(p is not None for p in parts):
                    qkv, o, gate_up, down = ((p.weight_t, p.col_norms) for p in parts)
                    fused.attach_sparsity((*qkv, (q, kv, kv)), o, gate_up, down)

    def kernel_product(self, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """x -> x @ weight^T through the CPU kernel, on a packed copy of weight [out, in] (any
        layout; float32 keeps float32 outputs), for an intervention's own products; None where
        the kernel does not run here."""
        if self.dense_kernel is None:
            return None
        return partial(self.dense_kernel.linear, weight=self.dense_kernel.pack(weight.contiguous()))

    def sparsity_plan(self, targets: list[float], tokens_per_row: int) -> SparsityPlan | None:
        """None when no row asks for sparsity: such a batch does no extra work."""
        if self.wina is None or not any(t > 0 for t in targets):
            return None
        return SparsityPlan.build(self.wina, targets, tokens_per_row, self._proj_out, self._layer_weight_total)

    def _kernel_applies_edits(self, edits: ForwardEdits | None) -> bool:
        """Whether every layer's neuron edit (if any) is one the fused layer applies itself (keep
        masks, one subspace)."""
        if edits is None:
            return True
        return all(n is None or n.for_kernel() is not None for n in map(edits.neurons, range(len(self.layers))))

    def _prepare_decode_layer(self, kernel: CpuDenseKernel, layer: DecoderLayer) -> PreparedDecodeLayer:
        attn, mlp = layer.attn, layer.mlp
        return kernel.prepare_decode_layer(
            attn_norm=layer.attn_norm.weight, mlp_norm=layer.mlp_norm.weight, eps=layer.attn_norm.eps,
            qkv=(attn.qkv.panels, attn.qkv.bias_f32), o=(attn.o_proj.panels, attn.o_proj.bias_f32),
            gate_up=(mlp.gate_up.panels, mlp.gate_up.bias_f32), down=(mlp.down.panels, mlp.down.bias_f32),
            heads=attn.num_heads, kv_heads=attn.num_kv_heads, head_dim=attn.head_dim,
            cos=self.rope.cos, signed_sin=self.rope.signed_sin, kv_dtype=self.kv_dtype)

    def _norm(self, state_dict: dict[str, torch.Tensor], name: str) -> RMSNorm:
        norm = RMSNorm(self.config.hidden_size, self.config.rms_norm_eps)
        norm.weight.data = state_dict[name].to(device=self.device, dtype=torch.float32)
        return norm

    @property
    def kv_dtype(self) -> torch.dtype:
        # The model dtype, as on CUDA, where the CPU decode kernel runs attention (it reads half
        # keys and values as fast as float32 ones, and the cache is what long-context steps read
        # most: benchmarks/decode_context.py). Without the kernel, float32: torch's attention over
        # half-precision keys ran 5x slower than over float32 ones on CPU.
        if self._kv_dtype is not None:
            return self._kv_dtype
        if self.device.type == "cpu" and self.dense_kernel is None:
            return torch.float32
        return self.dtype

    def new_cache(self, num_slots: int) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, num_slots, self.max_model_len, c.num_kv_heads, c.head_dim,
                       self.kv_dtype, self.device)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        slot_ids: torch.Tensor,
        start_positions: torch.Tensor,
        cache: KVCache,
        all_logits: bool = False,
        sparsity: SparsityPlan | None = None,
        edits: ForwardEdits | None = None,
    ) -> torch.Tensor:
        """token_ids: [B, T] (every row T new tokens, written at start_positions[b] onwards in its
        slot) -> float32 logits [B, V] for each row's last token, or [B, T, V] with all_logits.
        `edits`: the per-row interventions of this step (None: a batch that asks for none)."""
        # Callers may build these on the CPU (calibration, benchmarks): no-ops when already here.
        token_ids, slot_ids = token_ids.to(self.device), slot_ids.to(self.device)
        start_positions = start_positions.to(self.device)
        B, T = token_ids.shape
        positions = start_positions.unsqueeze(1) + torch.arange(T, device=token_ids.device)  # [B, T]
        kv_len = int(positions.max()) + 1
        if kv_len > self.max_model_len:
            raise ValueError(f"position {kv_len - 1} is past max_model_len {self.max_model_len}")
        h = F.embedding(token_ids, self.embed).float()  # [B, T, hidden]
        # On CPU, a decode step (one new token per row) runs each layer as one kernel call (neuron
        # keep masks and one memorization subspace included, and WINA sparsity: up to 8 sparse rows
        # through the sparse kernel, any number as masked dense projections, see masked_dense
        # below); a layer with more sparse rows than that, or that edits neurons otherwise, runs the
        # kernel's parts around torch projections,
        # which give the other rows the same numbers.
        # A short prompt chunk of one sequence runs as one call per layer too, its tokens as rows
        # of one slot (each attends to the keys up to its own position), sparse or not, unless it
        # edits neurons beyond what the kernel applies. Both match DecoderLayer.forward up to float32
        # summation order (tests/test_model.py, tests/test_wina_model.py). Without edits, all the
        # layers run in one kernel call (decode_stack: the same numbers, no Python between layers).
        fused, stacked = None, False
        if self.decode_layers is not None and B * T <= CpuDenseKernel.MAX_ROWS and (
                T == 1 or (B == 1 and self._kernel_applies_edits(edits)
                           and (sparsity is None or self.sparse_chunk_tokens is not None))):
            fused = self.decode_layers
        if fused is not None:
            # sparse token rows (each sparse sequence's T tokens)
            sparse_count = 0 if sparsity is None else T * (
                B if sparsity.sparse_rows is None else sparsity.sparse_rows.numel())
            # sparse rows that together ask for much of the weight: dense projections over their kept
            # inputs (the same numbers as the sparse kernel, faster there; any number of rows; a
            # chunk's rows beyond what the sparse kernel takes always)
            masked_dense = sparsity is not None and (
                sparsity.kept_share * T > self.dense_kernel.sparse_kernel_max_kept
                or (T > 1 and sparse_count > CPU_KERNEL_MAX_ROWS))
            fused_slots = slot_ids.to(torch.int64).repeat_interleave(T)  # [B*T], one per token row
            fused_positions = positions.to(torch.int64).reshape(-1).contiguous()  # [B*T]
            stacked = edits is None and (sparsity is None or (self.sparse_chunk_tokens is not None and (
                masked_dense or sparse_count <= CPU_KERNEL_MAX_ROWS)))
        else:
            attn_mask, is_causal = None, False
            if B == 1 and T == 1:
                pass  # one query at the newest position sees every cached key
            elif B == 1 and kv_len == T:
                is_causal = True  # a prompt's first chunk: plain causal masking
            else:
                keys = torch.arange(kv_len, device=token_ids.device)
                attn_mask = (keys.view(1, 1, -1) <= positions.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, S]
            slot_list = slot_ids.tolist()  # one read of the slots, for both decisions below
            single = (slot_list[0], int(start_positions[0])) if B == 1 else None
            first_slot = slot_list[0] if slot_list == list(range(slot_list[0], slot_list[0] + B)) else None
            rope = self.rope.tables(positions)
        if stacked:
            rows = h.reshape(B * T, 1, -1).contiguous()  # [B*T, 1, hidden]
            h = self.decode_stack(rows, cache.keys, cache.values, fused_slots, fused_positions,
                                  *_stack_tables(sparsity), masked_dense=masked_dense).view(B, T, -1)
        for i, layer in enumerate(() if stacked else self.layers):
            layer_sparsity = None if sparsity is None else sparsity.layer(i)
            neurons = None if edits is None else edits.neurons(i)
            kernel_edit = None if neurons is None or fused is None else neurons.for_kernel()
            keep = subspace = None
            if kernel_edit is not None:
                keep, subspace = kernel_edit.keep, kernel_edit.subspace
                if T > 1:  # one per token row: [B*T, ...]
                    keep = None if keep is None else keep.repeat_interleave(T, dim=0)
                    subspace = None if subspace is None else subspace.for_token_rows(T)
            if fused is None:
                h = layer.forward(h, rope, cache.layer(i, slot_ids, positions, kv_len, single, first_slot),
                                  attn_mask, is_causal, layer_sparsity, neurons)
            elif layer_sparsity is None and (neurons is None or kernel_edit is not None):
                rows = h.reshape(B * T, 1, -1).contiguous()  # [B*T, 1, hidden]: a view when T == 1
                h = fused[i](rows, cache.keys[i], cache.values[i], fused_slots, fused_positions, keep,
                             subspace=subspace).view(B, T, -1)
            elif fused[i].sparse and (masked_dense or sparse_count <= CPU_KERNEL_MAX_ROWS) and (
                    neurons is None or kernel_edit is not None):
                # the sparse rows' projections inside the one call (the others' dense), with the
                # numbers forward_decode's separate kernel calls would give; a chunk (B == 1) is one
                # sparse row per token
                rows = h.reshape(B * T, 1, -1).contiguous()  # [B*T, 1, hidden]
                h = fused[i](rows, cache.keys[i], cache.values[i], fused_slots, fused_positions, keep,
                             layer_sparsity.thresholds_ptr, layer_sparsity.kept_ptr, sparsity.sparse_rows,
                             subspace=subspace, masked_dense=masked_dense).view(B, T, -1)
            else:  # T == 1 here
                h = layer.forward_decode(fused[i], h.contiguous(), cache.keys[i], cache.values[i], fused_slots,
                                         fused_positions, layer_sparsity, neurons)
            if edits is not None:
                h = edits.residual(i, h, positions)
        if not all_logits:
            h = h[:, -1]  # [B, hidden]
        hidden = self.norm.forward(h)
        logits = self.head.forward(hidden).float()
        return logits if edits is None else edits.logits(hidden, logits)

    @property
    def sparse_chunk_tokens(self) -> int | None:
        """The longest prompt chunk that a sparse request's prefill runs in the fused CPU layers
        (2-3.6x faster than the torch layer path, and the numbers its decode steps give;
        benchmarks/RESULTS.md), or None where sparse chunks have no such path."""
        if self.decode_stack is None or not self.decode_stack.sparse:
            return None
        return CpuDenseKernel.MAX_ROWS

    def can_forward_rows(self, prompt_rows: int, decode_rows: int, sparse: bool = False) -> bool:
        """Whether forward_rows takes a prompt chunk of prompt_rows tokens beside decode_rows decode
        rows here (`sparse`: some of them with WINA sparsity): the CPU kernel's fused layers, each
        part no longer than forward runs fused on its own (so that each row gets the numbers of its
        own pass), with sparsity only where the fused layers run sparse rows (sparse_chunk_tokens)."""
        return (self.decode_layers is not None and 0 <= prompt_rows <= CpuDenseKernel.MAX_ROWS
                and 0 <= decode_rows <= CpuDenseKernel.MAX_ROWS and prompt_rows + decode_rows > 0
                and (not sparse or self.sparse_chunk_tokens is not None))

    @torch.inference_mode()
    def forward_rows(self, token_ids: torch.Tensor, slot_ids: torch.Tensor, positions: torch.Tensor,
                     cache: KVCache, logit_rows: torch.Tensor, sparsity: SparsityPlan | None = None) -> torch.Tensor:
        """Rows of different sequences in one pass, without interventions: row r is token
        token_ids[r] at positions[r] of slot slot_ids[r] ([R] each, a sequence's rows in ascending
        positions, e.g. one prompt chunk beside the decode rows of a step) -> float32 logits
        [len(logit_rows), V] of the rows logit_rows. Each row gets the numbers forward gives it
        when its sequence runs alone (the fused layer computes every row on its own and writes
        every row's key and value before any row attends); at most 2 x CpuDenseKernel.MAX_ROWS rows
        (a chunk and a decode step that can_forward_rows takes), with the CPU kernel. sparsity: the
        rows' plan (sparsity_plan of one target per row, tokens_per_row 1: a chunk's tokens as rows
        of their own), or None for dense rows; its kept counts are written per row."""
        R = token_ids.shape[0]
        if self.decode_layers is None or not 1 <= R <= 2 * CpuDenseKernel.MAX_ROWS:
            raise ValueError(f"forward_rows takes 1 to {2 * CpuDenseKernel.MAX_ROWS} rows with the CPU kernel, got {R}")
        slots = slot_ids.to(torch.int64).contiguous()  # [R]
        positions = positions.to(torch.int64).contiguous()  # [R]
        if int(positions.max()) >= self.max_model_len:
            raise ValueError(f"position {int(positions.max())} is past max_model_len {self.max_model_len}")
        masked_dense = False
        if sparsity is not None:
            sparse_count = R if sparsity.sparse_rows is None else sparsity.sparse_rows.numel()
            if sparsity.tokens_per_row != 1 or sparsity.kept.shape[1] != sparse_count or self.sparse_chunk_tokens is None:
                raise ValueError("forward_rows: sparsity needs a plan of one token per row, and fused sparse layers")
            # either way each row gets its own pass's numbers (the two compute the same sums)
            masked_dense = (sparsity.kept_share > self.dense_kernel.sparse_kernel_max_kept
                            or sparse_count > CPU_KERNEL_MAX_ROWS)
        h = F.embedding(token_ids, self.embed).float().view(R, 1, -1)  # [R, 1, hidden]
        h = self.decode_stack(h, cache.keys, cache.values, slots, positions, *_stack_tables(sparsity),
                              masked_dense=masked_dense)
        hidden = self.norm.forward(h[logit_rows, 0])  # [S, hidden]
        return self.head.forward(hidden).float()

    @torch.inference_mode()
    def residual_stream(self, token_ids: torch.Tensor, layer: int) -> torch.Tensor:
        """token_ids: [B, T] whole sequences (no padding) -> float32 residual stream after decoder
        layer `layer`, [B, T, hidden]. Runs only layers 0..layer (for calibration: SAE training,
        steering vectors)."""
        B, T = token_ids.shape
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer {layer} outside 0..{len(self.layers) - 1}")
        cache = KVCache(layer + 1, B, T, self.config.num_kv_heads, self.config.head_dim, self.kv_dtype, self.device)
        positions = torch.arange(T, device=self.device).expand(B, T)
        slots = torch.arange(B, device=self.device)
        attn_mask = None if B == 1 else (torch.arange(T, device=self.device).view(1, 1, -1)
                                         <= positions.unsqueeze(-1)).unsqueeze(1)
        rope = self.rope.tables(positions)
        h = F.embedding(token_ids.to(self.device), self.embed).float()
        for i in range(layer + 1):
            h = self.layers[i].forward(h, rope, cache.layer(i, slots, positions, T, None, 0), attn_mask, B == 1)
        return h
