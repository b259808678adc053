"""Pure-PyTorch reference for allmem_ops: the oracle ops and the AllMem model (float64-capable)."""

from .swa import swa_mask, swa_naive  # noqa: E402

from .model_config import AllMemConfig  # noqa: E402
from .model import AllMemForCausalLM  # noqa: E402
from .convert import convert_from_hf  # noqa: E402
from .generate import generate, state_nbytes  # noqa: E402
from .ttt import TTTState, ttt_memory_chunked, ttt_memory_naive  # noqa: E402
