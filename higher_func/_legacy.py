"""higher 0.2.1's private names of ``higher.patch`` and of its patched modules, kept for the
programs that read or edit them.

They describe higher's mechanism (a class built per submodule, a shared ``params_box`` that a
call fills and empties, attribute copying steered by ``_internal_attrs``), which does not exist
here. Each one keeps the meaning a program can observe: the values a program reads are what
higher's would hold at rest (between calls), and the helpers do what they did. The two that
only make sense inside higher's machinery (``_make_functional``, ``_update_patched_params``)
raise an error naming the public function that does the job. ``docs/porting.md`` lists them.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional

import torch

if TYPE_CHECKING:
    from .patch import _MonkeyPatchBase

__all__ = [
    "HIGHER_ATTRIBUTES",
    "_ParameterPlaceholder",
    "_internal_attrs",
    "_make_functional",
    "_modify_internally",
    "_patched_parameters",
    "_update_patched_params",
]

#: The ``nn.Module`` attributes higher did not copy from a module onto its patched version,
#: so that, among other things, the module's hooks never ran there. Programs edit it (e.g.
#: remove ``"_forward_pre_hooks"`` so that weight-norm or spectral-norm pre-hooks run). Editing
#: it changes nothing here: every attribute of the module, hooks included, is always seen by
#: the patch's copy of the module (what removing a hook dict's name asked higher for), and
#: nn.Module's own bookkeeping is always the copy's own.
_internal_attrs = {
    "_backend",
    "_parameters",
    "_buffers",
    "_backward_hooks",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_modules",
}


class _ParameterPlaceholder:
    """What higher showed in place of a parameter in the repr of a patched module."""

    def __init__(self, name: str) -> None:
        self._param_name = name

    def __repr__(self) -> str:
        return f'Parameter placeholder ("{self._param_name}")'


_ParameterPlaceholder.__name__ = _ParameterPlaceholder.__qualname__ = "ParameterPlaceholder"


@contextlib.contextmanager
def _modify_internally(fmodule: Any) -> Iterator[None]:
    """higher's switch under which assigning a parameter name of a patched module set the slot
    without recording new fast weights. A no-op here: assigning a parameter name of the
    patched module always records new fast weights (``fmodel.weight = w``), as outside it in
    higher, and the copies' slots are only written by the patch."""
    yield


def _patched_parameters(
    self: "_MonkeyPatchBase", recurse: bool = True, time: Optional[int] = None
) -> Iterator[torch.Tensor]:
    """``self.parameters(recurse, time)``: higher's implementation of a patched module's
    ``parameters``, as a function taking the patched module."""
    return self.parameters(recurse, time)


def _make_functional(module: Any, params_box: Any, params_offset: int, root_patched: Any = None):
    """higher's recursive builder of patched classes; there are none here.

    Raises:
        NotImplementedError: always; use ``make_functional`` or ``monkeypatch``.
    """
    raise NotImplementedError(
        "higher.patch._make_functional built higher's per-module patched classes, which "
        "higher_func does not have: use higher_func.patch.make_functional(module) or "
        "monkeypatch(module)"
    )


def _update_patched_params(fmodule: Any, params_box: Any, params_offset: int) -> int:
    """higher's writer of a ``params_box`` into the patched submodules; there is no box here.

    Raises:
        NotImplementedError: always; use ``fmodule.update_params(params)``.
    """
    raise NotImplementedError(
        "higher.patch._update_patched_params wrote higher's params_box into its patched "
        "submodules, which higher_func does not have: use fmodule.update_params(params)"
    )


def _expand_params(fmodule: "_MonkeyPatchBase", params: List[torch.Tensor]) -> List[torch.Tensor]:
    params = list(params)
    return [params[i] for i in fmodule._hf_tree.param_index.values()]


def _refill_params_box(fmodule: "_MonkeyPatchBase", params: Optional[Any]) -> None:
    if params is not None:
        fmodule.fast_params = params
    elif fmodule.fast_params is None:
        raise ValueError(
            "this patched module has no fast weights: pass params= (a list in "
            "module.parameters() order), or create it with monkeypatch()"
        )


def _param_names(fmodule: "_MonkeyPatchBase") -> List[str]:
    return [k for k, p in fmodule._hf_module._parameters.items() if p is not None]


#: The attributes of higher's patched (root) module that this one lacks, by name, each as a
#: function of the patched module computing its value. The patched module reads them only
#: when the user's module has no attribute of that name, so they never hide one of its own.
HIGHER_ATTRIBUTES: Dict[str, Callable[["_MonkeyPatchBase"], Any]] = {
    # False between calls, which is all a program ever sees of it.
    "_being_modified_internally": lambda f: False,
    # The fast weights with each tied weight repeated under each of its names.
    "_expand_params": lambda f: functools.partial(_expand_params, f),
    # higher kept the generator module.parameters() of the original module.
    "_original_params": lambda f: iter(f._hf_tree.params),
    # For each parameter name (tied ones too), the index of its distinct tensor.
    "_param_mapping": lambda f: list(f._hf_tree.param_index.values()),
    # The names of the module's own (not its submodules') parameters.
    "_param_names": _param_names,
    # Make params the fast weights, or check there are some.
    "_refill_params_box": lambda f: functools.partial(_refill_params_box, f),
    # The patched module is its own root.
    "_root_ref": lambda f: None,
    "root": lambda f: f,
    "is_root": lambda f: True,
    # True between calls (a call of a submodule is a "direct" call of it).
    "direct_submodule_call": lambda f: True,
    "_wrapped_name": lambda f: type(f._hf_module).__name__,
    # The module's forward on the current fast weights.
    "boxed_forward": lambda f: f.forward,
}
