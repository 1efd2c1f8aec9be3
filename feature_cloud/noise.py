r"""Counter-based random numbers for the feature cloud: noise as a pure function of its coordinates.

The cloud angle of sample row ``n`` and class ``j`` at a training step is

.. math:: \alpha_{nj} = \mathrm{std}_n \, z(\mathrm{key}, n, j), \qquad
          \mathrm{key} = \mathrm{key}(\mathrm{seed}, \mathrm{step}, \mathrm{stream})

with ``z`` a standard normal computed from the integers alone (no generator state), so

* nothing but the ``seed`` and ``step`` tensors has to be checkpointed (module state is tensors
  only: ``state_dict``, EMA copies, ONNX/TorchScript/``torch.export`` and ``torch.compile``
  all see plain buffers);
* every chunking of the classes, every class shard and every backend (reference, fused,
  chunked, sharded) draws the same number for the same ``(n, j)``;
* the draw runs on the data's device in ordinary integer/float tensor ops (``torch.compile``
  fuses it into one kernel).

Construction (all arithmetic modulo :math:`2^{32}`): classes are taken in pairs
``p = j // 2``; the pair counter ``c = n * ceil(C / 2) + p + k_0`` is hashed twice with a
bijective two-round xorshift-multiply hash (constants from C. Wellons' *hash prospector*, both
below :math:`2^{31}`), ``h_1 = H(c)``, ``h_2 = H(h_1 \oplus k_1)``; their top 24 bits give
``u_1 \in (0, 1]`` and ``u_2 \in [0, 1)`` and the Box-Muller transform gives the two normals of
the pair, ``z_{n,2p} = r\cos\phi``, ``z_{n,2p+1} = r\sin\phi`` with ``r = \sqrt{-2\ln u_1}``,
``\phi = 2\pi u_2``. Within one key the counters of all ``B x C`` entries are distinct as long
as ``B * ceil(C / 2) < 2**32``. The key words ``k_0, k_1`` hash the 64-bit seed, the 64-bit step
and a small ``stream`` (the rank under synchronised statistics) and ``purpose`` (cloud angles or
class sampling) together.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._compat import is_compiling, is_exporting, is_tracing

__all__ = [
    "noise_key",
    "random_key",
    "counter_normal",
    "counter_normal_at",
    "counter_uniform",
    "PURPOSE_CLOUD",
    "PURPOSE_SAMPLING",
]

#: ``purpose`` of the cloud angles and of the sharded head's class sampling (independent keys).
PURPOSE_CLOUD = 0
PURPOSE_SAMPLING = 1

_M32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97  # hash prospector [16 21f0aaad 15 735a2d97 15]
_GOLDEN = 0x9E3779B9
_TWO_PI_2_24 = 2.0 * math.pi * 2.0**-24


def _hash64(x: Tensor) -> Tensor:
    """The two-round hash on int64 tensors holding values in ``[0, 2**32)`` (key derivation)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32  # products stay below 2**63
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    return x ^ (x >> 15)


def _hash32_(x: Tensor) -> Tensor:
    """The same hash in place on int32 tensors (two's complement, wrapping multiply)."""
    x.bitwise_xor_((x >> 16) & 0xFFFF).mul_(_MUL1)
    x.bitwise_xor_((x >> 15) & 0x1FFFF).mul_(_MUL2)
    return x.bitwise_xor_((x >> 15) & 0x1FFFF)


def _to_int32(x: Tensor) -> Tensor:
    """int64 values in ``[0, 2**32)`` -> the int32 with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def noise_key(seed: Tensor, step: Tensor, stream: int = 0, purpose: int = PURPOSE_CLOUD) -> Tensor:
    """The two 32-bit key words ``(2,)`` int64 of one draw, on the device of ``seed``.

    ``seed`` and ``step`` are int64 tensors (any values; the module buffers), ``stream`` and
    ``purpose`` small non-negative integers. Pure tensor ops: no host sync, traceable.
    """
    seed = seed.reshape(()).to(torch.int64)
    step = step.reshape(()).to(device=seed.device, dtype=torch.int64)
    h = _hash64(
        torch.full(
            (),
            (int(stream) * _GOLDEN + int(purpose) * 0x85EBCA6B + 1) & _M32,
            dtype=torch.int64,
            device=seed.device,
        )
    )
    for i, word in enumerate((seed & _M32, (seed >> 32) & _M32, step & _M32, (step >> 32) & _M32)):
        h = _hash64(((h ^ word) + (i + 1) * _GOLDEN) & _M32)
    return torch.stack([h, _hash64(h ^ 0x5BD1E995)])


def random_key(device: torch.device, generator: Optional[torch.Generator] = None) -> Tensor:
    """A key drawn from a ``torch.Generator`` (the global RNG when ``None``), for one-off draws."""
    words = torch.randint(
        0,
        2**32,
        (2,),
        dtype=torch.int64,
        generator=generator,
        device=generator.device if generator is not None else "cpu",
    )
    return words.to(device)


def _box_muller(pair: Tensor, key: Tensor, odd: Optional[Tensor] = None) -> Tensor:
    """Normals of the int32 pair counters ``pair`` ``(P, B)`` (overwritten): ``(P, 2, B)`` (cosine
    and sine normal of each pair) or, with ``odd`` given, ``(P, B)`` (the sine where ``odd``)."""
    h1 = _hash32_(pair)
    h2 = _hash32_(h1 ^ _to_int32(key[1]))
    u1 = ((h1 >> 8) & 0xFFFFFF).add_(1).to(torch.float32).mul_(2.0**-24)  # (0, 1]
    phi = ((h2 >> 8) & 0xFFFFFF).to(torch.float32).mul_(_TWO_PI_2_24)  # [0, 2 pi)
    r = u1.log_().mul_(-2.0).sqrt_()
    if odd is not None:
        return r.mul_(torch.where(odd, torch.sin(phi), torch.cos(phi)))
    if is_compiling():  # (no strided out= under dynamo; fused away anyway)
        return torch.stack([r * torch.cos(phi), r * torch.sin(phi)], 1)
    out = torch.empty((pair.shape[0], 2, pair.shape[1]), dtype=torch.float32, device=pair.device)
    torch.mul(r, torch.cos(phi), out=out[:, 0])  # written in place: no stacking copy in eager
    torch.mul(r, phi.sin_(), out=out[:, 1])
    return out


def capturing() -> bool:
    """Whether a graph is being captured (``torch.compile``, ``torch.export``, ``jit.trace``)."""
    return is_compiling() or is_exporting() or is_tracing()


def _hash32_buf_(x: Tensor, t: Tensor) -> Tensor:
    """:func:`_hash32_` with a scratch buffer ``t`` (no allocation)."""
    for shift, mask, mul in ((16, 0xFFFF, _MUL1), (15, 0x1FFFF, _MUL2), (15, 0x1FFFF, None)):
        torch.bitwise_right_shift(x, shift, out=t)
        x.bitwise_xor_(t.bitwise_and_(mask))
        if mul is not None:
            x.mul_(mul)
    return x


#: elements per block of the CPU path (int32/float32 scratch stays in cache)
_CPU_BLOCK = 1 << 17


def _blocked_box_muller(key: Tensor, pairs: Tensor, num_rows: int, num_classes: int) -> Tensor:
    """:func:`_box_muller` of :func:`_pair_counters` in cache-sized blocks of pairs, written in
    place (CPU eager: the same numbers, about as fast as ``torch.randn``)."""
    P = pairs.shape[0]
    out = torch.empty((P, 2, num_rows), dtype=torch.float32)
    rows = _to_int32(
        (torch.arange(num_rows, dtype=torch.int64) * ((num_classes + 1) // 2) + key[0]) & _M32
    )
    k1 = _to_int32(key[1])  # a tensor: no host read
    n = max(8, (_CPU_BLOCK // max(num_rows, 1)) // 8 * 8)  # whole vectors per block
    h1 = torch.empty((min(n, P), num_rows), dtype=torch.int32)
    h2, t = torch.empty_like(h1), torch.empty_like(h1)
    f, g, q = (torch.empty(h1.shape, dtype=torch.float32) for _ in range(3))
    for a in range(0, P, n):
        m = min(n, P - a)
        x, y, tt, ff, rr, ss = h1[:m], h2[:m], t[:m], f[:m], g[:m], q[:m]
        torch.add(pairs[a : a + m, None], rows[None, :], out=x)
        _hash32_buf_(x, tt)
        _hash32_buf_(torch.bitwise_xor(x, k1, out=y), tt)
        # transcendental ops on contiguous scratch (several times slower on the strided rows
        # of ``out``); only the two final products write into ``out``
        # int32 -> float32 by copy_ (exact below 2^24), then float32 arithmetic: an int32 times
        # a Python float would compute in torch's default dtype (bfloat16 under Lightning's
        # bf16-true) before the float32 ``out=``
        torch.bitwise_right_shift(x, 8, out=tt).bitwise_and_(0xFFFFFF).add_(1)
        rr.copy_(tt).mul_(2.0**-24).log_().mul_(-2.0).sqrt_()  # r from u1 in (0, 1]
        torch.bitwise_right_shift(y, 8, out=tt).bitwise_and_(0xFFFFFF)
        ff.copy_(tt).mul_(_TWO_PI_2_24)  # phi in [0, 2 pi)
        torch.mul(torch.sin(ff, out=ss), rr, out=out[a : a + m, 1])
        torch.mul(rr, ff.cos_(), out=out[a : a + m, 0])
    return out


def _pair_counters(key: Tensor, pairs: Tensor, num_rows: int, num_classes: int) -> Tensor:
    """int32 counters ``pairs[:, None] + n * ceil(C / 2) + k_0`` ``(len(pairs), num_rows)``."""
    rows = torch.arange(num_rows, dtype=torch.int64, device=key.device) * ((num_classes + 1) // 2)
    return pairs.to(torch.int32).unsqueeze(1) + _to_int32((rows + key[0]) & _M32).unsqueeze(0)


def counter_normal(
    key: Tensor, num_rows: int, class_start: int, class_end: int, num_classes: int
) -> Tensor:
    """Standard normals ``(class_end - class_start, num_rows)`` (class-major, float32).

    Entry ``[j - class_start, n]`` is ``z(key, n, j)`` of a head with ``num_classes`` classes
    (see the module docstring): any class range of the same head reads the same numbers.
    """
    if not 0 <= class_start <= class_end <= num_classes:
        raise ValueError(f"class range [{class_start}, {class_end}) outside [0, {num_classes}]")
    p0, p1 = class_start // 2, (class_end + 1) // 2
    pairs = torch.arange(p0, p1, dtype=torch.int32, device=key.device)
    if key.device.type == "cpu" and not capturing():
        z = _blocked_box_muller(key, pairs, num_rows, num_classes)
    else:
        z = _box_muller(_pair_counters(key, pairs, num_rows, num_classes), key)
    z = z.view(2 * (p1 - p0), num_rows)  # rows 2p (cosine normal), 2p + 1 (sine normal)
    first = class_start - 2 * p0
    return z[first : first + class_end - class_start]


def counter_normal_at(key: Tensor, num_rows: int, classes: Tensor, num_classes: int) -> Tensor:
    """:func:`counter_normal` at arbitrary class indices ``classes`` ``(K,)``: ``(K, num_rows)``."""
    classes = classes.to(torch.int64)
    pair = _pair_counters(key, torch.div(classes, 2, rounding_mode="floor"), num_rows, num_classes)
    return _box_muller(pair, key, odd=(classes % 2 == 1).unsqueeze(1).expand(-1, num_rows))


def counter_uniform(key: Tensor, start: int, end: int) -> Tensor:
    """Uniforms in ``[0, 1)`` ``(end - start,)`` float32: entry ``i - start`` depends on ``(key, i)``."""
    device = key.device
    c = _to_int32((torch.arange(start, end, dtype=torch.int64, device=device) + key[0]) & _M32)
    h = _hash32_(_hash32_(c) ^ _to_int32(key[1]))
    return ((h >> 8) & 0xFFFFFF).to(torch.float32).mul_(2.0**-24)
