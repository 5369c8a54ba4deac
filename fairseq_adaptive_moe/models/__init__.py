"""fairseq models of this plugin (fairseq's ``--user-dir`` imports this package)."""

from .adaptive_moe_transformer import (  # noqa: F401  (registers the model and architectures)
    AdaptiveMoETransformerConfig,
    AdaptiveMoETransformerDecoder,
    AdaptiveMoETransformerEncoder,
    AdaptiveMoETransformerModel,
    adaptive_moe_transformer,
    adaptive_moe_transformer_small,
    adaptive_moe_transformer_tiny,
    adaptive_moe_transformer_wmt19_de_en,
)
from .adaptive_moe_bart import AdaptiveMoEBARTModel, MoEBARTConfig  # noqa: F401  (registers BART)
from .adaptive_moe_transformer_lm import (  # noqa: F401  (registers the LM and its archs)
    AdaptiveMoETransformerLanguageModel,
    AdaptiveMoETransformerLMConfig,
    moe_lm_architecture,
)
from .config import MoEConfig, MoEConfigError, check_moe_args, set_moe_defaults  # noqa: F401
from .layers import (  # noqa: F401
    MoEFFNMixin,
    MoETransformerDecoderLayer,
    MoETransformerEncoderLayer,
    build_moe_layer,
    is_moe_layer,
)
