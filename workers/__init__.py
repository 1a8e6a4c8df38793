"""Render workers: the task lifecycle, the renderer and the engine under it."""

import logging


class _Silenced(logging.Filter):
    """Drops a library's notice that says nothing to an archfarm user, printed on every start."""

    def __init__(self, notice: str) -> None:
        super().__init__()
        self.notice = notice

    def filter(self, record: logging.LogRecord) -> bool:
        return self.notice not in record.getMessage()


# archfarm never uses transformers' image processors for rendering (DPT runs on its own tensors).
logging.getLogger("transformers.utils.import_utils").addFilter(_Silenced("requires torchvision"))
# With the `quant` extra: archfarm quantises ControlNets as it loads them, never reading torchao checkpoints,
# torchao's own registration notice is addressed to torchao's developers, and its optional kernels for other
# GPU architectures (mxfp8, cutlass sm90a) are not what int8 weight-only needs.
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(_Silenced("Tensor objects"))
logging.getLogger("torch.utils._pytree").addFilter(_Silenced("is an Enum subclass"))
logging.getLogger("torchao").addFilter(_Silenced("Failed to load"))
