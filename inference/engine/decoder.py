"""The forward pass: a lean re-implementation of the Llama forward pass (SmolLM2 is a Llama) over
a static key/value cache, with the same arithmetic as transformers' own, so greedy text equals
`model.generate`'s. Plain `generate` spends most of a step outside the matrix products; here a
step is the products, a few dozen element-wise operations per layer and nothing else.

Prompts run layer by layer here, their projections on the native block kernel (blocks) or
torch's product (fp32 weights), and so does a lone sequence's step on fp32 weights (the same
arithmetic as `generate`). Every other decode step goes through the native kernels
(inference/native) in one call for every layer: on blocks they read a sixth of fp32's bytes, and
on fp32 torch's product repacks the weights on every call and runs at a third of the memory's
speed for a handful of rows."""

import numpy
import torch
import torch.nn.functional as F

from inference.engine.weights import GROUPS

_EXACT_CANDIDATES = 64


class DecoderMixin:
    """Engine's forward pass. Reads ``self.decoder`` (DecoderWeights), the key/value cache
    ``self._keys`` and ``self._values`` ([layers, slots, kv heads, positions, head dim]) and
    ``self._active`` (whose adapter each slot's row uses)."""

    def _forward(self, tokens, positions, *, prefill, slot=None, adapter=None, every=False, start=0, slots=None):
        """Logits of the last position (of every position with ``every``), on the fp32 weights.
        Prefill: ``tokens`` is [1, T], one sequence's prompt from position ``start`` (the keys
        and values before it already in ``slot``), its keys and values kept in ``slot``
        (unless None). Decode: [B, 1], row i in cache slot ``slots[i]`` (default i) at
        positions[i]; several rows, or any on an int8 engine, go through the native kernels."""

        d = self.decoder
        if not prefill and d.kernels is not None and (tokens.shape[0] > 1 or d.quantized or d.packed):
            return self._decode_native(tokens, positions, kernel="exact", slots=slots)
        batch, length = tokens.shape
        rows = batch * length
        if prefill:
            adapters = [] if adapter is None else [(adapter, None)]
            cos, sin = d.cos[start : start + length], d.sin[start : start + length]  # [T, hd]: over heads
            span = start + length
            # After a reused opening: each new token sees the opening and the new tokens up to itself.
            mask = (torch.arange(span)[None] <= torch.arange(start, span)[:, None]) if start else None
        else:
            cos, sin = d.cos[positions][:, None, None], d.sin[positions][:, None, None]  # [B, 1, 1, hd]
            span = int(positions.max()) + 1
            # True where a row must not look: past its own length.
            mask = None if batch == 1 else (torch.arange(span)[None] > positions[:, None])[:, None, None]
            adapters = self._adapter_rows(slots)
            if slots is None:
                slots = torch.arange(batch)
                cached = slice(0, batch)
            elif batch == 1:  # a view of the one slot, not a copy of its keys and values
                cached = slice(int(slots[0]), int(slots[0]) + 1)
            else:
                cached = slots
        hidden = d.embedding(tokens.reshape(-1))  # [rows, D]
        heads, kv_heads, scale = d.num_heads, d.num_kv_heads, d.head_dim**-0.5
        q_width, kv_width = heads * d.head_dim, kv_heads * d.head_dim
        for index, layer in enumerate(d.layers):
            x = _rms_norm(hidden, layer.input_norm, d.eps)
            qkv = self._project(layer.qkv, x, index, "qkv", adapters)
            # Rotary embedding on the queries and keys at once: element-wise, so the same numbers.
            qk = qkv[:, : q_width + kv_width].view(batch, length, heads + kv_heads, d.head_dim).transpose(1, 2)
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk.split((heads, kv_heads), dim=1)
            v = qkv[:, q_width + kv_width :].view(batch, length, kv_heads, d.head_dim).transpose(1, 2)
            if prefill:
                if slot is not None:
                    self._keys[index, slot, :, start:span] = k[0]
                    self._values[index, slot, :, start:span] = v[0]
                if start:
                    keys = self._keys[index, slot : slot + 1, :, :span]
                    values = self._values[index, slot : slot + 1, :, :span]
                    attended = F.scaled_dot_product_attention(
                        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
                    )
                else:
                    attended = F.scaled_dot_product_attention(
                        q, k, v, is_causal=length > 1, scale=scale, enable_gqa=True
                    )
                attended = attended.transpose(1, 2).reshape(rows, q_width)
            else:
                self._keys[index, slots, :, positions] = k[:, :, 0]
                self._values[index, slots, :, positions] = v[:, :, 0]
                if isinstance(cached, slice):
                    keys = self._keys[index, cached, :, :span]
                    values = self._values[index, cached, :, :span]
                else:  # rows in scattered slots: copy just their keys and values so far
                    keys = self._keys[index, :, :, :span].index_select(0, cached)
                    values = self._values[index, :, :, :span].index_select(0, cached)
                if mask is None:  # one sequence: transformers' kernel, same numbers
                    attended = F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True)
                    attended = attended.transpose(1, 2).reshape(rows, q_width)
                else:
                    # One query per row: plain products beat the fused kernel, which is built for long queries.
                    grouped = q.reshape(batch, kv_heads, heads // kv_heads, d.head_dim)
                    scores = (grouped @ keys.transpose(-1, -2)) * scale
                    if mask is not None:
                        scores = scores.masked_fill(mask, float("-inf"))
                    scores = scores.softmax(-1)
                    attended = (scores @ values).reshape(rows, q_width)
            hidden = hidden + self._project(layer.o, attended, index, "o", adapters)
            x = _rms_norm(hidden, layer.post_norm, d.eps)
            gate, up = self._project(layer.gate_up, x, index, "gate_up", adapters).chunk(2, dim=-1)
            hidden = hidden + self._project(layer.down, F.silu(gate) * up, index, "down", adapters)
        last = _rms_norm(hidden if every else hidden.view(batch, length, -1)[:, -1], d.norm, d.eps)
        return self._head(last)

    def _decode_native(self, tokens, positions, *, kernel, slots=None):
        """A decode step through the native kernels (inference/native): one call for every layer,
        fp32 activations throughout, the projections on the int8 or fp32 weights (``kernel``).
        ``tokens`` [rows, 1]: row i in cache slot ``slots[i]`` (default i) at ``positions[i]``.
        Each row's numbers are its own, whatever the other rows are."""
        d = self.decoder
        adapters = self._adapter_rows(slots)
        # Per layer and group, (A, B, rows) of each adapter in the step that has that group.
        deltas = [
            [
                [(*adapter.layers[index][group], rows) for adapter, rows in adapters if group in adapter.layers[index]]
                for group in GROUPS
            ]
            for index in range(len(d.layers))
        ] if adapters else []  # fmt: skip
        hidden = d.kernels.decode_layers(
            d.embedding(tokens.reshape(-1)), d.native_layers[kernel], deltas, self._keys, self._values,
            d.cos[positions], d.sin[positions], positions, slots, d.num_heads, d.num_kv_heads, d.head_dim**-0.5, d.eps,
        )  # fmt: skip
        return self._head(d.kernels.rms_norm(hidden, d.norm, d.eps), kernel=kernel)

    def _head(self, last, *, kernel=None):
        """Logits [rows, vocab] of the final hidden states."""

        d = self.decoder
        if kernel != "int8" or d.lm_head.scales is None:  # no int8 copy of a head in blocks
            return d.lm_head(last, kernel=kernel)
        logits = d.lm_head(last, kernel="int8")
        # A greedy pick and nearly all sampled mass are among the best few: rescore those with
        # the fp32 rows, so int8 changes the choice only when it misranks the best.
        best = logits.topk(min(_EXACT_CANDIDATES, logits.shape[-1]), dim=-1).indices  # [rows, k]
        exact = torch.einsum("rd,rkd->rk", last, d.lm_head.rows(best))
        return logits.scatter_(1, best, exact)

    def _adapter_rows(self, slots=None):
        """[(adapter, rows)] for a step's rows (row i of the sequence in slot ``slots[i]``,
        default i): rows None when every row uses it."""

        owners = self._active if slots is None else [self._active[slot] for slot in slots.tolist()]
        groups = {}
        for row, sequence in enumerate(owners):
            if sequence.adapter is not None:
                groups.setdefault(id(sequence.adapter), (sequence.adapter, []))[1].append(row)
        result = []
        for adapter, rows in groups.values():
            every = len(rows) == len(owners)
            result.append((adapter, None if every else torch.tensor(rows)))
        return result

    @staticmethod
    def _project(projection, x, index, group, adapters):
        """``projection`` of ``x`` plus each adapter's delta on its rows (torch's path; the native
        step does the same in kernels.cpp's project)."""
        y = projection(x)
        for adapter, rows in adapters:
            weights = adapter.layers[index].get(group)
            if weights is None:
                continue
            a, b = weights
            x = x.to(a.dtype)
            y = y.to(a.dtype)
            if rows is None:
                y = y + (x @ a.T) @ b.T
            else:
                y = y.index_add(0, rows, (x[rows] @ a.T) @ b.T)
        return y


def _lazy_zeros(shape):
    """A float32 tensor of zeros whose pages the OS zeroes as they are first touched
    (calloc), in 4 KB pages (no transparent huge pages, which numpy asks for): the key/value
    cache then takes memory for the context lengths in use, not for the worst case. Zeros,
    not garbage: a masked position still multiplies a probability of 0 by what it holds,
    and 0 x NaN is NaN."""
    from numpy._core.multiarray import _set_madvise_hugepage

    previous = _set_madvise_hugepage(False)
    try:
        return torch.from_numpy(numpy.zeros(shape, dtype=numpy.float32))
    finally:
        _set_madvise_hugepage(previous)


def _rms_norm(x, weight, eps):

    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _rotate_half(x):

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
