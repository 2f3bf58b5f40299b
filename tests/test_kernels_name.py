"""The checkout's ``kernels/`` directory is installed as ``specexec_rt.kernels``; from the repository
root (``python -m pytest``, ``python -c``) it is also importable as a bare ``kernels``, the name of
Hugging Face's kernel-hub package that transformers imports when it is installed. These run fresh
interpreters from the root and check the bare name goes to that package (or to an empty module),
never to a second copy of our ops."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, *, env_extra=None, flags=()):
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


def test_bare_name_goes_to_the_installed_kernels_package(tmp_path):
    # A stand-in for Hugging Face's package, later on sys.path than the checkout's root.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'hub'\n__version__ = '0.19.1'\n")
    out = _run("""
        import sys
        assert sys.path[0] == ''  # the checkout's root comes first, as with python -m pytest
        import kernels
        print(kernels.CUDAProperties, kernels.__version__)
        print(sys.modules['kernels'] is kernels, 'kernels.argmax' in sys.modules)
        from specexec_rt.kernels import tree_attention
        print(tree_attention.__module__)
    """, env_extra={"PYTHONPATH": str(tmp_path)})
    assert out[:2] == ["hub 0.19.1", "True False"], out
    assert out[2].startswith("specexec_rt.kernels."), out


def test_bare_name_without_an_installed_package_is_an_empty_module():
    # -S: no site-packages, so nothing else named kernels can be found.
    out = _run("""
        import sys
        import kernels
        print(hasattr(kernels, 'tree_attention'), hasattr(kernels, '__version__'),
              sorted(m for m in sys.modules if m.startswith('kernels')))
    """, flags=("-S",))
    assert out == ["False False ['kernels']"], out


def test_transformers_configs_import_from_the_repository_root():
    # transformers probes for the kernel-hub package by this name on its first config import.
    out = _run("""
        import transformers
        print(transformers.LlamaConfig.__name__)
        import specexec_rt.kernels as k
        print(callable(k.int4_matmul))
    """)
    assert out == ["LlamaConfig", "True"], out
