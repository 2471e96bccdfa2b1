"""The patch's own copies of the tensors a module holds besides its parameters.

A forward may write a buffer or a plain tensor attribute in place (``self.mask.mul_(0.5)``,
BatchNorm's running statistics), so the patch needs its own. Two rules make that cheap and
faithful:

- Copies are copy-on-write where torch can make them (``_compat.lazy_clone``): memory is only
  copied when a forward writes, so a 16 MB lookup table read by every forward costs nothing
  per patch.
- Copies are made per storage, not per tensor: a tensor that is a view of a buffer stays a
  view of the patch's buffer, and buffers sharing memory keep sharing it.

Tensors that require gradients are cloned on the tape instead (a meta-gradient may flow
through them), and so is everything under ``torch.compile``, where storages are not traced.
"""

from __future__ import annotations

from typing import Dict

import torch

from ._compat import lazy_clone, storage_key

__all__ = ["TensorCopies"]


class TensorCopies:
    """One patch's copies of non-parameter tensors, memoized by storage.

    Args:
        compiling: the patch is built inside a ``torch.compile`` trace.

    Example:
        >>> copies = TensorCopies(compiling=False)
        >>> buffer = torch.zeros(4)
        >>> view = buffer[1:]
        >>> mine, my_view = copies.copy(buffer), copies.copy(view)
        >>> _ = my_view.fill_(1.0)
        >>> mine.tolist(), buffer.tolist()
        ([0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0])
    """

    def __init__(self, compiling: bool) -> None:
        self._compiling = compiling
        self._storages: Dict[int, torch.Tensor] = {}  # storage key -> a tensor over its copy

    def copy(self, tensor: torch.Tensor, detach: bool = False) -> torch.Tensor:
        if detach and tensor.requires_grad:
            tensor = tensor.detach()
        if self._compiling or not _by_storage(tensor):
            return tensor.clone()
        storage = tensor.untyped_storage()
        key = storage_key(storage)
        base = self._storages.get(key)
        if base is None:
            if tensor.storage_offset() == 0 and tensor.is_contiguous():
                if tensor.numel() * tensor.element_size() == storage.nbytes():
                    # The usual case: the tensor is its whole storage. One op.
                    new = self._storages[key] = lazy_clone(tensor)
                    return new
            whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            base = self._storages[key] = lazy_clone(whole)
        view = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return view.set_(
            base.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride()
        )

    def shares_storage(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` shares memory with a tensor copied so far."""
        return _by_storage(tensor) and storage_key(tensor.untyped_storage()) in self._storages


def _by_storage(tensor: torch.Tensor) -> bool:
    # Only plain dense tensors are views of a storage that set_ can rebuild; a conjugate or
    # negative view carries a bit set_ would drop.
    return (
        type(tensor) is torch.Tensor
        and not tensor.requires_grad
        and tensor.layout == torch.strided
        and tensor.device.type != "meta"
        and not tensor.is_quantized
        and not tensor.is_conj()
        and not tensor.is_neg()
    )
