"""SSTA building blocks (Wu et al., ICML 2022; see ``shared/papers/ssta.md``): per-head attention capture
on timm ViTs and the choice of the teacher's / teaching assistant's head. The loss terms that use them live in
``repro/methods/ssta.py`` (``ssta_attn``, ``deit_hard``) and ``repro/methods/ssl_pretrain.py``."""
from repro.ssta.attention import (READINGS, AttentionCapture, attention_kl, block_attention, default_reading,
                                  dist_token_index, unwrap_vit)
from repro.ssta.head_importance import (
    FeatureProbe,
    HeadSelection,
    attention_entropy,
    file_fingerprint,
    gradient_head_importance,
    last_blocks_features,
    load_linear_probe,
    model_fingerprint,
    preserved_rng,
    select_heads,
    select_heads_cached,
    selection_cache_path,
)

__all__ = [
    "READINGS", "AttentionCapture", "FeatureProbe", "HeadSelection", "attention_entropy", "attention_kl",
    "block_attention", "default_reading", "dist_token_index", "file_fingerprint", "gradient_head_importance",
    "last_blocks_features",
    "load_linear_probe", "model_fingerprint", "preserved_rng", "select_heads", "select_heads_cached",
    "selection_cache_path", "unwrap_vit",
]
