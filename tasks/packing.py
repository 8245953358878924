"""Decode faster on CPU with the model transformers loaded: its linear weights packed once.

At a decode step every linear layer multiplies a few rows (one per sequence) by its weight, and
PyTorch's CPU path for `F.linear` and GPT-2's `Conv1D` (an `addmm` against a `[in, out]` weight)
repacks the weight into the GEMM kernel's blocked layout on every call: a step costs several
times the time it takes to read the weights. Here each linear weight is reordered once, at load,
into oneDNN's blocked layout (`mkldnn._reorder_linear_weight`, as `torch.compile` does when it
freezes CPU weights), and each `nn.Linear` / `Conv1D` module is replaced by one that calls the
packed inner product (`mkldnn._linear_pointwise`).

Nothing else changes: the pipeline, `generate()`, the cache, attention and sampling are
transformers' own. The products are the same matrices summed in another order (equal to about
1e-6); the texts are unchanged in every case `benchmarks/generation_parity.py` and the tests
compare. A weight tied to the input embedding gains a packed copy; untied weights are replaced,
so they take no extra memory.

`TEXTGEN_PACKED_WEIGHTS=0` (`tasks.config`) loads models as transformers does. The two oneDNN
operators are private to torch (torch has no public packed linear for eager mode):
tests/test_internals.py fails loudly when they change.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tasks import config

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Packing:
    """What packing did to one loaded model."""

    layers: int
    """Linear layers now running on packed weights."""
    extra_bytes: int
    """Memory added: packed copies of weights that are also used unpacked (tied embeddings)."""
    skipped: str = ""
    """Why nothing was packed, when nothing was."""

    def describe(self) -> str:
        """One line for the run's params: `packed-linear (49 layers)` or `none (why)`."""
        if self.layers:
            return f"packed-linear ({self.layers} layers)"
        return f"none ({self.skipped})" if self.skipped else "none"


@functools.cache
def packed_linear_class() -> Any:
    """The module class packed layers become (built on first use, so torch loads lazily)."""
    import torch

    class PackedLinear(torch.nn.Module):
        """`y = x W^T + b` through oneDNN's inner product, with W packed once."""

        def __init__(self, weight: Any, bias: Any) -> None:
            super().__init__()
            self.out_features, self.in_features = (int(n) for n in weight.shape)
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self.bias = None if bias is None else bias.detach()

        def forward(self, x: Any) -> Any:
            rows = x.reshape(-1, self.in_features)
            if not rows.is_contiguous():
                rows = rows.contiguous()
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
            return y.reshape(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, packed"

    return PackedLinear


def why_not(model: Any, device: str) -> str:
    """Why this model is not packed here; empty when it can be."""
    import torch

    if not config.PACKED_WEIGHTS.get():
        return f"{config.PACKED_WEIGHTS.name}=0"
    if device != "cpu":
        return f"device {device}"
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return "this torch has no oneDNN"
    dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
    if dtype not in _DTYPES:
        return f"dtype {dtype}"
    return ""


def pack_linears(model: Any, device: str) -> Packing:
    """Replace the model's `nn.Linear` and `Conv1D` layers by packed ones, in place.

    Only layers of exactly those classes are replaced (a quantized or otherwise specialised
    subclass keeps its own forward). A layer whose weight is also used elsewhere (an output
    projection tied to the embeddings) keeps the weight there and gets a packed copy. A short
    forward pass before and after checks the packed model computes the same logits; if it does
    not (a model whose code reads a layer's weight directly), the layers are put back."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if reason := why_not(model, device):
        return Packing(layers=0, extra_bytes=0, skipped=reason)
    started = time.perf_counter()
    packed_cls = packed_linear_class()
    shared = _shared_weights(model)
    replaced: list[tuple[Any, str, Any]] = []
    extra = 0
    # no_grad, not inference_mode: the packed weights stay ordinary tensors, usable in any mode.
    with torch.no_grad():
        try:
            vocab = int(getattr(model.config, "vocab_size", 0) or 2)
            probe = torch.arange(4, dtype=torch.long).unsqueeze(0) % vocab
            expected = model(input_ids=probe).logits
        except Exception as exc:  # a model this check cannot run stays as it is
            return Packing(0, 0, skipped=f"no check forward: {type(exc).__name__}")
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    weight = child.weight
                elif type(child) is Conv1D:
                    weight = child.weight.t().contiguous()  # Conv1D keeps [in, out]
                else:
                    continue
                setattr(parent, name, packed_cls(weight, child.bias))
                replaced.append((parent, name, child))
                if id(child.weight) in shared:
                    extra += child.weight.numel() * child.weight.element_size()
        problem = ""
        try:
            got = model(input_ids=probe).logits
            scale = float(expected.abs().max()) or 1.0
            if got.shape != expected.shape or float((got - expected).abs().max()) > 1e-3 * scale:
                problem = "packed logits differ"
        except Exception as exc:  # any failure means: run it unpacked
            problem = f"packed forward failed: {type(exc).__name__}"
        if problem:
            for parent, name, child in replaced:
                setattr(parent, name, child)
            logger.warning("Not packing %s: %s", type(model).__name__, problem)
            return Packing(0, 0, skipped=problem)
    seconds = time.perf_counter() - started
    logger.info("Packed %d linear layers in %.2f s (%d bytes added)", len(replaced), seconds, extra)
    return Packing(layers=len(replaced), extra_bytes=extra)


def _shared_weights(model: Any) -> set[int]:
    """Ids of weights held by a linear layer and by some other module (tied weights)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    holders = Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))
    linear = {id(m.weight) for m in model.modules() if type(m) in (torch.nn.Linear, Conv1D)}
    return {key for key in linear if holders[key] > 1}
