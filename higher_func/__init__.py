"""higher_func: differentiable inner loops with higher's API, on torch.func.

Legacy code keeps working with one changed line::

    import higher_func as higher

    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in support:
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(xq), yq).backward()  # meta-gradients in model's .grad
"""

from . import patch, utils
from .patch import monkeypatch

__all__ = ["patch", "utils", "monkeypatch"]
