"""fairseq models of this plugin (fairseq's ``--user-dir`` imports this package)."""

from .adaptive_moe_transformer import (  # noqa: F401  (registers the model and architectures)
    AdaptiveMoETransformerConfig,
    AdaptiveMoETransformerDecoder,
    AdaptiveMoETransformerEncoder,
    AdaptiveMoETransformerModel,
)
from .config import MoEConfig, MoEConfigError, check_moe_args, set_moe_defaults  # noqa: F401
from .layers import (  # noqa: F401
    MoEFFNMixin,
    MoETransformerDecoderLayer,
    MoETransformerEncoderLayer,
    build_moe_layer,
    is_moe_layer,
)
