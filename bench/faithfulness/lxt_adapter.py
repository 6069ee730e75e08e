"""LXT (LRP eXplains Transformers) AttnLRP and CP-LRP for the BERT and GPT-2 of transformers 5.

LXT 2.1 computes LRP as gradient x input after patching the model's modules with its rules:
layer norms with the normalising factor detached, the identity rule on activations, and in
attention the uniform rule (AttnLRP: 1/4 of the gradient to query and key, 1/2 to value) or no
gradient through the softmax at all (CP-LRP: query and key detached). Two things in LXT 2.1
stop it from running on transformers 5 as shipped:

* ``lxt.efficient.models`` imports every bundled architecture at once, and its BERT entry is a
  copy of transformers 4's ``modeling_bert`` importing ``transformers.modeling_attn_mask_utils``,
  which transformers 5 removed: ``import lxt.efficient`` fails. We register a stand-in for that
  package (real submodules stay importable) before importing LXT's rules and patches.
* its ``patch_attention`` replaces transformers' ``ALL_ATTENTION_FUNCTIONS`` registry with a
  plain dict, which transformers 5 calls ``get_interface`` on. We wrap the models'
  ``eager_attention_forward`` with LXT's own wrappers instead and run the model in eager mode.

Everything else is LXT's code: its ``layer_norm_forward``, ``dropout_forward``,
``identity_rule_implicit``, ``wrap_attention_forward`` and ``cp_wrap_attention_forward``, in the
patch maps LXT uses for these two architectures. Patches are global (``nn.LayerNorm.forward``),
so :func:`patched` undoes them on exit: no other method may run under them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn


def _import_lxt() -> types.SimpleNamespace:
    """LXT's rules and patches, without its models package (see the module docstring)."""
    name = "lxt.efficient.models"
    if name not in sys.modules:
        spec = importlib.util.find_spec("lxt")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("lxt is not installed")
        stand_in = types.ModuleType(name)
        stand_in.__path__ = [str(Path(spec.submodule_search_locations[0]) / "efficient/models")]

        def get_default_map(module: Any) -> dict:
            raise NotImplementedError("bundled LXT patch maps are unavailable on transformers 5")

        stand_in.get_default_map = get_default_map
        sys.modules[name] = stand_in
    from lxt.efficient import patches, rules

    return types.SimpleNamespace(
        layer_norm=patches.layer_norm_forward,
        dropout=patches.dropout_forward,
        attention={
            "attnlrp": patches.wrap_attention_forward,
            "cplrp": patches.cp_wrap_attention_forward,
        },
        identity=rules.identity_rule_implicit,
    )


@contextlib.contextmanager
def patched(model: nn.Module, variant: str) -> Iterator[None]:
    """Apply LXT's ``variant`` ("attnlrp" or "cplrp") patch map to ``model``'s architecture."""
    lxt = _import_lxt()
    saved: list[tuple[Any, str, Any]] = []

    def put(owner: Any, attr: str, value: Any) -> None:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    put(nn.LayerNorm, "forward", lxt.layer_norm)
    put(nn.Dropout, "forward", lxt.dropout)
    arch = model.config.model_type
    if arch == "bert":
        from transformers.models.bert import modeling_bert as modeling

        def intermediate(self: nn.Module, h: Tensor) -> Tensor:
            return lxt.identity(self.intermediate_act_fn, self.dense(h))

        def pooler(self: nn.Module, h: Tensor) -> Tensor:
            return lxt.identity(self.activation, self.dense(h[:, 0]))

        put(modeling.BertIntermediate, "forward", intermediate)
        put(modeling.BertPooler, "forward", pooler)
    elif arch == "gpt2":
        from transformers.models.gpt2 import modeling_gpt2 as modeling

        def mlp(self: nn.Module, h: Tensor) -> Tensor:
            return self.c_proj(lxt.identity(self.act, self.c_fc(h)))

        put(modeling.GPT2MLP, "forward", mlp)
    else:
        raise NotImplementedError(f"no LXT patch map for {arch!r} here")
    wrap = lxt.attention[variant]
    put(modeling, "eager_attention_forward", wrap(modeling.eager_attention_forward))
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(implementation)
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)
