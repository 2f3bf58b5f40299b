"""The package's shape: the public API the README shows, imports that run downward only (no
cycles), and a wheel that carries its native sources and finds them once installed."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from specexec_rt.kernels import cpu_native
from specexec_rt.offload import native

ROOT = Path(__file__).resolve().parent.parent
# Lowest first. A module may import from its own layer or any layer below it, never above.
LAYERS = ["errors", "csrc", "kernels", "model", "offload", "loading", "speculative", "serving", "<top>"]


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for the runtime (specexec_rt/) and the kernels and native
    sources installed inside it (kernels/ -> specexec_rt.kernels, csrc/ -> specexec_rt.csrc)."""
    out = {}
    for base, pkg in ((ROOT / "specexec_rt", "specexec_rt"), (ROOT / "kernels", "specexec_rt.kernels"),
                      (ROOT / "csrc", "specexec_rt.csrc")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Every package module ``name`` imports, at module level or inside functions."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:       # `import specexec_rt.x.y` also runs its packages
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 and parts[1] in LAYERS else "<top>")


def test_imports_run_downward_and_have_no_cycles():
    modules = _module_files()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    upward = [f"{a} -> {b}" for a, deps in graph.items() for b in deps if _layer(b) > _layer(a)]
    assert not upward, "imports must run serving -> speculative -> loading -> offload -> model -> kernels:\n" \
        + "\n".join(sorted(upward))
    state: dict = {}
    cycles = []

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_module_is_in_the_design_table():
    """docs/DESIGN.md's module table lists every module (newcomers navigate by it)."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    missing = []
    for name, path in _module_files().items():
        rel = path.relative_to(ROOT).as_posix()
        if path.name in ("__init__.py", "__main__.py"):
            continue
        if f"`{rel}`" not in design:
            missing.append(rel)
    assert not missing, f"docs/DESIGN.md does not list: {missing}"


def _readme_imports() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    lines = []
    for block in blocks:
        lines += [ln.strip() for ln in block.splitlines() if re.match(r"\s*(from specexec_rt|import specexec_rt)", ln)]
    return lines


def test_readme_imports_work():
    lines = _readme_imports()
    names = {n.strip() for ln in lines if " import " in ln for n in ln.split(" import ", 1)[1].split(",")}
    # The public API the README promises.
    for required in ("load_model", "load_tokenizer", "Engine", "default_draft", "tree_attention", "int4_matmul",
                     "quantize_int4", "Int4Weight"):
        assert required in names, f"README shows no import of {required}"
    namespace: dict = {}
    for ln in lines:
        exec(ln, namespace)         # noqa: S102 - the README's own import lines
    import specexec_rt
    from specexec_rt import kernels

    for n in specexec_rt.__all__:
        assert hasattr(specexec_rt, n), n
    for n in kernels.__all__:
        assert callable(getattr(kernels, n)), n
    assert specexec_rt.kernels.tree_attention is kernels.attention.tree_attention


@pytest.mark.slow
def test_wheel_carries_native_sources_and_finds_them(tmp_path):
    """Build the wheel, install it (no editable install in the way) and check that the
    installed package imports, finds its native sources inside itself and builds from them the
    CPU int4 kernel (where a C compiler exists) and the copy engine (where nvcc exists)."""
    wheel_dir = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(wheel_dir), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = wheel_dir.glob("specexec_rt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("specexec_rt/csrc/offload.cu", "specexec_rt/csrc/offload.h", "specexec_rt/csrc/__init__.py",
              "specexec_rt/csrc/specexec_cpu.c", "specexec_rt/csrc/cpu_common.h", "specexec_rt/csrc/int4_cpu.h",
              "specexec_rt/csrc/int4_cpu_avx512.h", "specexec_rt/csrc/q8_cpu.h", "specexec_rt/csrc/f32_cpu.h",
              "specexec_rt/csrc/attn_cpu.h", "specexec_rt/csrc/layers_cpu.h", "specexec_rt/csrc/argmax_cpu.h",
              "specexec_rt/csrc/loader.py",
              "specexec_rt/kernels/attention/launch.py", "specexec_rt/kernels/int4/cpu.py", "specexec_rt/kernels/q8/cpu.py",
              "specexec_rt/kernels/cpu_native.py", "specexec_rt/serving/cli.py"):
        assert f in names, f
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check = (
        "import specexec_rt, sys\n"
        "from specexec_rt import Engine, load_model, default_draft\n"
        "from specexec_rt.kernels import tree_attention, int4_matmul\n"
        "from specexec_rt.offload import native\n"
        "from specexec_rt.kernels import cpu_native\n"
        "print(specexec_rt.__file__)\n"
        "print(native.CSRC)\n"
        "print(all((native.CSRC / n).is_file() for n in native.SOURCES + cpu_native.SOURCES))\n"
        "if cpu_native.find_compiler()[0]:\n"
        "    lib = cpu_native.load(cpu_native.build(cache_dir=sys.argv[1]))\n"
        "    print('cpu', lib._name, lib.sxc_best_isa())\n"
        "if native.find_nvcc():\n"
        "    print(native.build(cache_dir=sys.argv[1]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", check, str(tmp_path / "native-cache")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].startswith(str(site)), f"the installed copy was not the one imported: {out[0]}"
    assert out[1].startswith(str(site)) and out[2] == "True", out
    rest = out[3:]
    if cpu_native.find_compiler()[0]:  # the CPU kernel builds from the installed sources
        line = rest.pop(0)
        assert line.startswith(f"cpu {tmp_path / 'native-cache'}") and Path(line.split()[1]).is_file(), line
    if native.find_nvcc():
        assert Path(rest[0]).is_file()
