"""Which way the Triton kernels run in tests: compiled on a GPU, interpreted on CPU tensors without one."""
import os


def cuda_available() -> bool:
    import torch  # importing torch does not import triton

    return torch.cuda.is_available()


def configure_triton_interpreter() -> None:
    """Turn the interpreter on where no GPU exists; leave an explicit setting alone."""
    if "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "0" if cuda_available() else "1"
