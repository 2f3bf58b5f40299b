"""Which way the Triton kernels run in tests: compiled on a GPU, interpreted on CPU tensors without one."""
import os


def cuda_available() -> bool:
    import torch  # importing torch does not import triton

    return torch.cuda.is_available()


def configure_triton_interpreter() -> None:
    """Turn the interpreter on where no GPU exists; leave an explicit setting alone."""
    if "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "0" if cuda_available() else "1"


def load_script(path, name: str):
    """Import a bench script (bench/ is not a package) from its path as module ``name``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dry_run_env(collected) -> dict:
    """The environment of a GPU script's ``--dry`` subprocess: the interpreter switches left to
    the script (it sets them before Triton loads), ``$OUT`` at ``collected``."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPECEXEC_TRITON_INTERPRET")}
    env["OUT"] = str(collected)
    return env
