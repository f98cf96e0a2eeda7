"""Layer variants: attention kinds (`attention`), their per-layer cache state (`cache`), expert kinds
(`expert_kinds`), routing written once (`routing`), and the stateless blocks every kind uses
(`blocks`: RMSNorm, RoPE; re-exported here, where they lived as `modeling.layers`)."""

from .blocks import (ROPE_TYPES, RMSNorm, RopeConfig, apply_rope, rms_norm, rope_cos_sin, rope_tables, rotate_half,
                     swiglu)

__all__ = ["ROPE_TYPES", "RMSNorm", "RopeConfig", "apply_rope", "rms_norm", "rope_cos_sin", "rope_tables",
           "rotate_half", "swiglu"]
