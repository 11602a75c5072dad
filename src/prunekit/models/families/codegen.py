"""CodeGen splits its fused qkv_proj into model-parallel shards, each holding [q, v, k] of a few heads.

That order is not one prunekit removes heads from, so its heads are left whole (named as opaque).
"""

from prunekit.models.base import ADAPTERS, ModelAdapter


@ADAPTERS.register("codegen")
class CodeGenAdapter(ModelAdapter):
    model_types = ("codegen",)
    qkv_layout = "opaque"
