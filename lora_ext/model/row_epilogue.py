"""Per-output-feature work after the LoRA op, for the rows of some slots: DoRA's magnitude and
the bias of lora_B (PEFT's lora_bias=True).

For the rows of slot s the layer must return, with y0 = x W^T, b0 the base bias, c the scaling:
    plain LoRA      y0 + b0 + c B A x                       (what the op computes: `out`)
    lora_bias       y0 + b0 + c (B A x + b)               = out + c b
    DoRA            y0 + b0 + (g - 1) y0 + g c B A x      = g out + (1 - g) b0
with g = m / ||W + c B A|| per output feature (PEFT's weight norm over the input dimension,
detached). Both are `out * scale_s + offset_s` with per-slot tables of one row per output
feature, computed when the adapter enters the slot; base rows and other slots use scale 1 and
offset 0, which leave `out` bitwise unchanged. The tables are float32 (g is not rounded to a
half-precision dtype) and have a row 0 for base rows, so a batch indexes them with slot + 1.
"""

import torch

from lora_ext.adapters.config import AdapterError


def weight_norm(weight, in_out, lora_a, lora_b, scaling):
    """||W + c B A|| over the input dimension, one value per output feature, float32, outside
    autograd (PEFT detaches it). weight: the base weight as the layer stores it (in_out: (in, out))."""
    with torch.no_grad():
        w = weight.detach().float()
        w = w.T if in_out else w
        delta = lora_b.detach().to(device=w.device, dtype=torch.float32) @ lora_a.detach().to(device=w.device,
                                                                                              dtype=torch.float32)
        return torch.linalg.vector_norm(w + scaling * delta, dim=1)


def scale_and_offset(g, bias, scaling, base_bias, width, device):
    """The (scale, offset) rows of one slot, float32: DoRA's g (or ones) and c b (or zeros), with
    DoRA's (1 - g) b0 added (`base_bias`: the layer's unmerged bias or None). Differentiable in g
    and bias (training builds them from leaves)."""
    offset = torch.zeros(width, dtype=torch.float32, device=device)
    if bias is not None:
        offset = offset + scaling * bias.to(device=device, dtype=torch.float32)
    if g is None:
        return torch.ones_like(offset), offset
    scale = g.to(device=device, dtype=torch.float32)
    offset = scale * offset
    if base_bias is not None:
        offset = offset + (1 - scale) * base_bias.detach().to(device=device, dtype=torch.float32)
    return scale, offset


def apply_tables(out, scale, offset, index):
    """out (..., d_out) * scale[index] + offset[index] in float32, back in out's dtype."""
    rows = out.reshape(-1, out.shape[-1])
    return torch.addcmul(offset[index], rows.float(), scale[index]).to(out.dtype).view(out.shape)


def dora_scale(weight, in_out, lora_a, lora_b, scaling, magnitude, where):
    """g = m / ||W + c B A|| per output feature, float32 (W: the base weight as the layer stores
    it, unmerged). Refuses a zero or non-finite norm or g (the adapter would produce NaN)."""
    norm = weight_norm(weight, in_out, lora_a, lora_b, scaling)
    g = magnitude.detach().to(device=norm.device, dtype=torch.float32) / norm
    if not torch.isfinite(g).all():
        bad = int((~torch.isfinite(g)).sum())
        raise AdapterError(f"{where}: DoRA's scale m / ||W + scaling * B A|| is NaN or infinite for {bad} output "
                           f"features (a zero norm or a huge magnitude)")
    return g.cpu()


class RowEpilogue(torch.nn.Module):
    """The tables of one layer: row_scale and row_offset (slots + 1, d_out), float32."""

    def __init__(self, max_adapters, out_features, device):
        super().__init__()
        opts = dict(dtype=torch.float32, device=device)
        self.register_buffer("row_scale", torch.ones(max_adapters + 1, out_features, **opts), persistent=False)
        self.register_buffer("row_offset", torch.zeros(max_adapters + 1, out_features, **opts), persistent=False)
        self.slots = set()  # slots whose adapter has DoRA or a lora_B bias in this layer

    def write(self, slot, weights, base_bias, non_blocking=False):
        """Sets the tables of `slot` for `weights` (ModuleSlotWeights, or None: not targeted) over
        a layer whose unmerged bias is `base_bias` (or None)."""
        g = None if weights is None else weights.dora_scale
        bias = None if weights is None else weights.lora_bias
        if g is None and bias is None:
            if slot in self.slots:
                self.row_scale[slot + 1].fill_(1.0)
                self.row_offset[slot + 1].zero_()
                self.slots.discard(slot)
            return
        scale, offset = scale_and_offset(g, bias, weights.scaling, base_bias, self.row_offset.shape[1],
                                         self.row_scale.device)
        self.row_scale[slot + 1].copy_(scale, non_blocking=non_blocking)
        self.row_offset[slot + 1].copy_(offset, non_blocking=non_blocking)
        self.slots.add(slot)

    def applies_to(self, batch):
        return bool(self.slots) and not self.slots.isdisjoint(batch.slots)

    def forward(self, out, index):
        """out (..., d_out) * row_scale[index] + row_offset[index], index: each row's slot + 1."""
        return apply_tables(out, self.row_scale, self.row_offset, index)

    def _apply(self, fn, *args, **kwargs):
        """.half() and the like must not round the tables: they follow the device only."""
        tables = (self.row_scale, self.row_offset)
        result = super()._apply(fn, *args, **kwargs)
        device = self.row_scale.device
        self._buffers["row_scale"], self._buffers["row_offset"] = (t.to(device=device) for t in tables)
        return result
