"""Pure-PyTorch reference for allmem_ops: the oracle ops and the AllMem model (float64-capable)."""
from .convert import convert_from_hf
from .generate import CUDAGraphDecoder, generate, state_nbytes
from .model import AllMemForCausalLM
from .model_config import AllMemConfig
from .swa import swa_mask, swa_naive
from .ttt import TTTState, ttt_memory_chunked, ttt_memory_naive

__all__ = [
    "AllMemConfig",
    "AllMemForCausalLM",
    "TTTState",
    "convert_from_hf",
    "CUDAGraphDecoder",
    "generate",
    "state_nbytes",
    "swa_mask",
    "swa_naive",
    "ttt_memory_chunked",
    "ttt_memory_naive",
]
