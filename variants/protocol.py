"""The model type that capture, cuts and patching are written against.

TransformerLens's `TransformerLensModel` protocol names only `cfg`, `run_with_cache`, `run_with_hooks` and
`to_tokens`. poslens's hooks also reach for the hook surface that TransformerLens's own models have
(`HookedRootModule` and `TransformerBridge` alike): the `hook_dict`, the `hooks(...)` context, calling the
model on tokens, train/eval mode and torch's forward pre-hooks. `HookedModel` names exactly that, for the
type checker; nothing checks it at run time.
"""

from __future__ import annotations

from typing import Any, Protocol

from transformer_lens.hook_points import HookPoint
from transformer_lens.model_protocol import TransformerLensModel


class HookedModel(TransformerLensModel, Protocol):
    """A TransformerLens model with its hook points and `nn.Module` surface (poslens's `HookedTransformer`,
    TransformerLens's `HookedTransformer` and `TransformerBridge`)."""

    training: bool

    @property
    def hook_dict(self) -> dict[str, HookPoint]: ...

    def hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def train(self, *args: Any, **kwargs: Any) -> Any: ...

    def eval(self) -> Any: ...

    def register_forward_pre_hook(self, *args: Any, **kwargs: Any) -> Any: ...
