"""Model Studio: open a checkpoint, look inside, build an optimization pipeline, run it, compare variants."""

import os

__version__ = "0.1.0"

# Nothing may download weights or data at run time: keep the Hugging Face libraries offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_library_loggers() -> None:
    """Libraries log harmless start-up noise (torchao's optional CUDA kernels failing to load on a CPU
    machine, torch's pytree deprecations); users should see only what matters to them."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


_quiet_library_loggers()
