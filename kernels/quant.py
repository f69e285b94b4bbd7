"""DeepSeek-V4 weight formats: FP8 e4m3 with ue8m0 128x128 block scales, FP4 e2m1 with ue8m0 per-32 scales.

Scales are kept as raw ue8m0 bytes (uint8; value = 2^(byte - 127)): a numeric cast of `float8_e8m0fnu`
would flush small exponents (docs/v4_model.md §5.5). FP4 packs two e2m1 codes per byte, the low nibble holding
the even element. Both formats are exact in bf16 and fp32 after dequantization (docs/v4_model.md §5.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass
class QuantTensor:
    """A weight as the checkpoint stores it: `data` plus optional ue8m0 `scale` bytes.

    fmt None: `data` is a plain float tensor [out, in].
    fmt "fp8": `data` float8_e4m3fn [out, in], `scale` uint8 [ceil(out/128), ceil(in/128)].
    fmt "fp4": `data` int8 [out, in/2] (two e2m1 codes per byte), `scale` uint8 [out, in/32].
    """

    data: torch.Tensor
    scale: torch.Tensor | None = None
    fmt: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        out, cols = self.data.shape
        return (out, cols * 2) if self.fmt == "fp4" else (out, cols)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.scale.nbytes if self.scale is not None else 0)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.fmt is None:
            return self.data.to(dtype)
        if self.fmt == "fp8":
            return dequant_fp8(self.data, self.scale, dtype)
        if self.fmt == "fp4":
            return dequant_fp4(self.data, self.scale, dtype)
        raise ValueError(f"unknown weight format {self.fmt!r}")


def ue8m0_to_float(scale_u8: torch.Tensor) -> torch.Tensor:
    return torch.exp2(scale_u8.to(torch.float32) - 127.0)


def _pow2_scale_bytes(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= qmax, as a ue8m0 byte."""
    exp = torch.ceil(torch.log2(amax.clamp(min=1e-30) / qmax))
    return (exp + 127).clamp(0, 254).to(torch.uint8)


def quant_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (e4m3 [out, in], ue8m0 bytes [ceil(out/128), ceil(in/128)])."""
    out, inn = w.shape
    ro, ri = -(-out // FP8_BLOCK), -(-inn // FP8_BLOCK)
    padded = torch.zeros(ro * FP8_BLOCK, ri * FP8_BLOCK, dtype=torch.float32)
    padded[:out, :inn] = w.float()
    blocks = padded.view(ro, FP8_BLOCK, ri, FP8_BLOCK)
    scale = _pow2_scale_bytes(blocks.abs().amax(dim=(1, 3)), FP8_MAX)
    q = blocks / ue8m0_to_float(scale)[:, None, :, None]
    q = q.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(ro * FP8_BLOCK, ri * FP8_BLOCK)
    return q[:out, :inn].contiguous(), scale


def dequant_fp8(q: torch.Tensor, scale_u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out, inn = q.shape
    expect = (-(-out // FP8_BLOCK), -(-inn // FP8_BLOCK))
    if tuple(scale_u8.shape) != expect:
        raise ValueError(f"FP8 weight [{out}, {inn}] needs a {list(expect)} block-scale grid, got "
                         f"{list(scale_u8.shape)}")
    s = ue8m0_to_float(scale_u8)
    s = s.repeat_interleave(FP8_BLOCK, 0)[:out].repeat_interleave(FP8_BLOCK, 1)[:, :inn]
    return (q.to(torch.float32) * s).to(dtype)


def quant_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in/2] packed e2m1, ue8m0 bytes [out, in/32]); round to nearest code."""
    out, inn = w.shape
    if inn % FP4_BLOCK:
        raise ValueError(f"FP4 weights need the input dim to be a multiple of {FP4_BLOCK}, got {inn}")
    blocks = w.float().view(out, inn // FP4_BLOCK, FP4_BLOCK)
    scale = _pow2_scale_bytes(blocks.abs().amax(dim=2), FP4_MAX)
    x = (blocks / ue8m0_to_float(scale)[..., None]).view(out, inn)
    mags = torch.tensor(E2M1_VALUES[:8])
    code = (x.abs()[..., None] - mags).abs().argmin(dim=-1).to(torch.uint8)
    code = code | ((x < 0).to(torch.uint8) << 3)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed.view(torch.int8), scale


def dequant_fp4(packed: torch.Tensor, scale_u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out, half = packed.shape
    if tuple(scale_u8.shape) != (out, half * 2 // FP4_BLOCK):
        raise ValueError(f"FP4 weight [{out}, {half * 2}] needs [{out}, {half * 2 // FP4_BLOCK}] scales, got "
                         f"{list(scale_u8.shape)}")
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    u8 = packed.view(torch.uint8)
    vals = torch.stack([lut[(u8 & 0xF).long()], lut[(u8 >> 4).long()]], dim=-1).view(out, half * 2)
    s = ue8m0_to_float(scale_u8).repeat_interleave(FP4_BLOCK, 1)
    return (vals * s).to(dtype)
