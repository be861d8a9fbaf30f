"""Split-key flash decoding for a few query rows, as a ``torch.library`` custom op.

The flash backend's inference path for few query rows (decode): the keys are split into chunks so that even one
query row fills the GPU; one Triton program per (chunk, batch · head, query block) runs the online softmax over its
chunk's keys only up to the query's position, reading K and V in place (the static cache's unwritten tail and the
paired value are never copied), and writes its chunk's normalised output and base-2 log-sum-exp. The chunks are
then merged by their softmax weights, the flash-decoding split-KV scheme (Dao et al., "Flash-Decoding for
long-context inference", 2023; written here from scratch).

The kernel launch is the custom op ``diffllama::flash_decode_partials`` with a fake (meta) implementation, so
``torch.compile(fullgraph=True)`` traces through it and a CUDA graph can capture it: it allocates only from the
input shapes and never reads a value back to the host. The merge and the differential combination stay plain
PyTorch, which Inductor fuses with the RMSNorm that follows.

Internal to the flash backend: :func:`diffllama.attention.flash.attention` checks shapes, dtypes and the mask
before it calls :func:`decode`; these functions do not repeat the checks. Same inputs as the flash backend's forward (:mod:`diffllama.attention.flash`): bf16/fp16, head_dim <= 256, an even
number of KV heads (the caller expands an odd KV). Runs on CPU only under ``TRITON_INTERPRET=1`` (development).
"""

from __future__ import annotations

import torch
import triton

from diffllama.attention.contract import combine_pairs
from diffllama.attention import flash_kernels as kernels
from diffllama.settings import triton_interpreting


def split_plan(b: int, h: int, sq: int, sk: int, dp: int, device: torch.device) -> tuple[int, int, int, int]:
    """``(splits, chunk, block_m, block_n)`` for (B, H, Sq) queries over Sk keys at padded head_dim ``dp``.

    Enough key chunks for about two programs per SM (at most 128 chunks, each a whole number of key blocks). Depends
    on shapes and the device only, so the fake implementation gets the same output shapes as the real one.
    """
    block_m = 16
    block_n = 16 if triton_interpreting() else (64 if dp <= 128 else 32)
    programs = b * h * triton.cdiv(sq, block_m)
    sms = 1 if triton_interpreting() else torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(triton.cdiv(sk, block_n), triton.cdiv(2 * sms, programs), 128))
    chunk = triton.cdiv(triton.cdiv(sk, splits), block_n) * block_n
    return triton.cdiv(sk, chunk), chunk, block_m, block_n


def _partial_shapes(q: torch.Tensor, k: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple]:
    b, h, sq, d = q.shape
    dp = triton.next_power_of_2(d)
    plan = split_plan(b, h, sq, k.shape[2], dp, q.device)
    return (plan[0], b, h, sq, 2 * dp), (plan[0], b, h, sq), plan


@torch.library.custom_op("diffllama::flash_decode_partials", mutates_args=())
def decode_partials(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor,
                    pad: torch.Tensor | None, scale: float, poison: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk attention of every query head, unmerged.

    Args:
        q: (B, H, Sq, d) bf16/fp16, last dim contiguous. k, v: (B, KV, Sk, d), KV even, H a multiple of KV.
        qpos: (Sq,) int64 key index of each query (causal: key j visible iff j <= qpos). pad: (B, Sk) uint8,
            1 for real keys, or None. scale: the softmax scale. poison: start the outputs as NaN (tests).

    Returns:
        ``(opart, lpart)``: opart (splits, B, H, Sq, 2·DP) float32, each chunk's softmax-normalised output over
        the paired value (halves at [:d] and [DP:DP+d], DP = d rounded up to a power of two); lpart
        (splits, B, H, Sq) float32, the chunk's base-2 log-sum-exp of the scaled scores, -inf for a chunk with no
        visible key. ``splits`` is :func:`split_plan`'s.
    """
    b, h, sq, d = q.shape
    kv, sk = k.shape[1], k.shape[2]
    opart_shape, lpart_shape, (splits, chunk, block_m, block_n) = _partial_shapes(q, k)
    opart = kernels.empty(opart_shape, torch.float32, q.device, poison)
    lpart = kernels.empty(lpart_shape, torch.float32, q.device, poison)
    pad_t = pad if pad is not None else qpos  # any valid pointer; unused without HAS_PAD
    kernels.attn_fwd_split[(splits, b * h, triton.cdiv(sq, block_m))](
        q, k, v, opart, lpart, qpos, pad_t, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        pad.stride(0) if pad is not None else 0, b, h, kv // 2, h // kv, sq, sk, chunk, scale * kernels.LOG2E,
        HEAD_DIM=d, DP=opart_shape[-1] // 2, HAS_PAD=pad is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4, num_stages=2)
    return opart, lpart


@decode_partials.register_fake
def _decode_partials_fake(q, k, v, qpos, pad, scale, poison=False):
    opart_shape, lpart_shape, _ = _partial_shapes(q, k)
    return q.new_empty(opart_shape, dtype=torch.float32), q.new_empty(lpart_shape, dtype=torch.float32)


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, pad: torch.Tensor | None,
           lambda_full: torch.Tensor, scale: float, *, poison: bool = False) -> torch.Tensor:
    """Differential attention output ``o1 − λ·o2``, (B, Sq, H/2, 2d) in q's dtype, with no gradient.

    Arguments as :func:`decode_partials`, plus ``lambda_full`` the layer's λ (0-d). Rows that see no key give 0.
    """
    d = q.shape[-1]
    opart, lpart = decode_partials(q, k, v, qpos, pad, scale, poison)
    dp = opart.shape[-1] // 2
    top = lpart.amax(0, keepdim=True)  # (1, B, H, Sq)
    weight = torch.exp2(lpart - top.clamp_min(-1e30)).nan_to_num(0.0)  # chunks with no key weigh 0
    total = weight.sum(0)
    per_head = (weight[..., None] * opart).sum(0) / total.clamp_min(1e-30)[..., None]  # (B, H, Sq, 2·DP)
    per_head = torch.cat((per_head[..., :d], per_head[..., dp:dp + d]), -1).to(q.dtype)  # (B, H, Sq, 2d)
    return combine_pairs(per_head, lambda_full.to(q.dtype))
