"""emo-serve's one implementation of its model families: EMO, OLMoE, Qwen3-MoE, Mixtral, GLM-4.5, gpt-oss,
DeepSeek-V3 / Kimi-K2, GLM-4.7-Flash, FlexOlmo (modeling.families)."""

from .config import ConfigError, ModelConfig, load_config
from .model import Generation, Model, ModelNotFound, load_model, resolve_checkpoint
from .layers.cache import KVCache
from .transformer import Batch, ChosenExperts, ForwardOutput, Pool, PoolError, ResolvedPool
from .io.profile import ProfileError, ProfileManifest, base_identity
from .io.safetensors_io import CheckpointError, CheckpointFiles, write_checkpoint
from .sampling import SamplingParams, StopChecker
from .tokenizer import Tokenizer, TokenizerError
from .families import FAMILIES, Family, register
from .names import TensorNames
from .layers.routing import Route, RoutingRule

__all__ = [
    "ChosenExperts",
    "FAMILIES", "Family", "Route", "RoutingRule", "register",
    "Batch", "CheckpointError", "CheckpointFiles", "ConfigError", "ForwardOutput", "Generation", "KVCache",
    "Model", "ModelConfig", "ModelNotFound", "Pool", "PoolError", "ProfileError", "ProfileManifest",
    "ResolvedPool", "SamplingParams", "StopChecker", "TensorNames", "Tokenizer", "TokenizerError",
    "base_identity", "load_config", "load_model", "resolve_checkpoint", "write_checkpoint",
]
