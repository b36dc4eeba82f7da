"""distlora: LoRA fine-tuning of causal LMs on Accelerate, 1 GPU to many nodes."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (the qlora extra), which peft imports whenever it is installed, warns at import on
# AVX512-BF16 CPUs that the `kernels` package is missing. Its only warning; that kernel serves only
# the CPU inference repack that distlora.model.keep_4bit_layout turns off.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
