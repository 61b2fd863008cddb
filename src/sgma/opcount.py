"""Counting the aten ops a piece of code dispatches, those among them that would make the host wait for a GPU, the
memory traffic they cause, and the floating-point operations it performs.

Works on any device (CPU and meta included), so the no-sync guarantee of the training step is tested without a GPU
(``tests/test_speed.py``) and measured by ``scripts/bench_step.py``, and the FLOPs and traffic SGF adds to a model
(:func:`flop_counter`, :attr:`OpCounter.bytes`) are the same figures on every machine.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

# ops that make the host wait for a GPU (on CPU they are counted instead of observed)
SYNC_OPS = {
    "aten._local_scalar_dense",  # .item(), bool(t), int(t), float(t), t.tolist() element-wise
    "aten.item",  # seen instead of the above where composite ops are dispatched whole (inference mode)
    "aten.is_nonzero",  # bool(t)
    "aten.equal",
    "aten.nonzero",
    "aten.nonzero_numpy",  # nonzero(as_tuple=True)
    "aten.argwhere",
    "aten.masked_select",
    "aten.bincount",
    "aten.multinomial",  # its one-sample path validates the probabilities on the host
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
}
BOOL_INDEXING_OPS = {"aten.index", "aten.index_put", "aten.index_put_"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched while active, among them those that synchronise on a GPU, and the memory traffic
    they would cause run one kernel each (:attr:`bytes`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if name in SYNC_OPS or (name in BOOL_INDEXING_OPS and _has_bool_index(args)):
            self.syncs[name] += 1
        out = func(*args, **(kwargs or {}))
        self.bytes += _traffic(name, (args, kwargs), out)
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _traffic(name: str, inputs, out) -> int:
    """Bytes an op moves when it runs as its own kernel: it reads every tensor input and writes every new output
    (an in-place op writes the tensor it mutates). A view moves nothing. A broadcast input counts at its stored
    size. An estimate of eager execution (caches and fused kernels move less), comparable between models."""
    tensors = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor) and t.layout == torch.strided]
    outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.layout == torch.strided]
    # storage identity, not data pointers: those are all 0 on the meta device
    storages = {t.untyped_storage()._cdata for t in tensors}
    written = [t for t in outputs if t.untyped_storage()._cdata not in storages]
    if not written:
        if not (outputs and name.endswith("_")):  # a view (or an op with no tensor output)
            return 0
        written = outputs[:1]  # in place
    return sum(_stored_bytes(t) for t in tensors) + sum(_stored_bytes(t) for t in written)


def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor's elements occupy, broadcast (stride-0) dimensions counted once."""
    n = t.element_size()
    for size, stride in zip(t.shape, t.stride(), strict=True):
        n *= size if stride else 1
    return n


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter (``with flop_counter() as c: ...; c.get_total_flops()``), with the backward of grouped
    convolutions counted right.

    torch (up to 2.13 at least; pytorch/pytorch#183405) counts a convolution's weight gradient as if the conv were
    dense: for a depthwise conv over N channels it reports N times its FLOPs, which would make SGF's depthwise
    projectors look ~100x costlier than they are in a training step. Here each gradient a backward computes
    costs what its forward costs (grad input: the transposed conv with the same weight; grad weight: the
    correlation of input and output gradient, the same multiply-adds), which holds for any stride and groups.
    """
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))
