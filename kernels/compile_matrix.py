"""Compile every kernel for real GPUs on a GPU-less machine and read back its resources.

Each kernel module lists `compile_specs()`: one `CompileSpec` per (config its launcher can pick,
dtype, specialization). `compile_spec` builds it with `triton.compile` for an explicit `GPUTarget`
and reads registers / spills / shared memory from the cubin with the cuobjdump Triton ships.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Max dynamic shared memory per block (opt-in), bytes.
TARGETS = {"sm_80": (80, 166_912), "sm_89": (89, 101_376), "sm_90": (90, 232_448)}


@dataclass
class CompileSpec:
    kernel: str                      # name shown in reports
    fn: object                       # the @triton.jit function (autotuners are unwrapped)
    signature: dict[str, str]        # non-constexpr arguments: name -> "*fp16", "i32", "fp32", ...
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 2
    hot: bool = True                 # hot kernels must not spill registers
    label: str = ""

    @classmethod
    def from_config(cls, kernel: str, fn, signature: dict[str, str], constexprs: dict[str, object],
                    config: triton.Config, **kw) -> "CompileSpec":
        fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
        return cls(kernel, fn, signature, {**constexprs, **config.kwargs}, config.num_warps, config.num_stages, **kw)


@dataclass
class CompileResult:  # plain data, so results can come back from worker processes
    kernel: str
    label: str
    target: str
    registers: int
    spill_bytes: int       # ptxas's spill stores per thread: > 0 means register spills
    shared: int
    shared_limit: int
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _ast_source(spec: CompileSpec) -> ASTSource:
    # Triton >= 3.3 takes constexprs separately and wants them in the signature as "constexpr".
    signature = {**spec.signature, **{k: "constexpr" for k in spec.constexprs}}
    # What a real launch tells the compiler: tensors from the allocator are 16-byte aligned and the
    # strides at the real shapes are multiples of 16 (without this, loads compile scalar and the
    # register counts mean nothing).
    names = list(spec.fn.arg_names)
    aligned = [n for n, t in spec.signature.items() if t.startswith("*") or n.startswith("stride")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return ASTSource(fn=spec.fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def spill_bytes(ptx: str, cc: int) -> int | None:
    """Spill stores reported by `ptxas -v` for this PTX (None if ptxas can't tell).

    The authoritative number: cuobjdump's STACK also counts frames that are not spills (e.g. the
    local array of sin/cos's slow argument reduction). Triton >= 3.7 emits PTX for sm_90 that only
    its `ptxas-blackwell` reads; Triton 3.6 ships just `ptxas`.
    """
    ptxas = next((p for p in (_tool("ptxas-blackwell"), _tool("ptxas")) if os.path.exists(p)), None)
    if ptxas is None:
        return None
    arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    found = re.findall(r"(\d+) bytes spill stores", out.stdout + out.stderr)
    return sum(map(int, found)) if out.returncode == 0 and found else None


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def compile_spec(spec: CompileSpec, target: str) -> CompileResult:
    cc, limit = TARGETS[target]
    try:
        k = triton.compile(_ast_source(spec), target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as e:  # compile failures are results too: report them per target
        return CompileResult(spec.kernel, spec.label, target, 0, 0, 0, limit,
                             [f"compile failed: {type(e).__name__}: {e}"])
    usage = resource_usage(k.asm["cubin"])
    shared = max(int(k.metadata.shared), usage.get("SHARED", 0))
    spills = spill_bytes(k.asm["ptx"], cc)
    if spills is None:  # no usable ptxas: local memory is the conservative stand-in
        spills = usage.get("LOCAL", 0) + usage.get("STACK", 0)
    res = CompileResult(spec.kernel, spec.label, target, usage.get("REG", 0), spills, shared, limit)
    if shared > limit:
        res.errors.append(f"shared memory {shared} B > {limit} B")
    if spec.hot and res.spill_bytes:
        res.errors.append(f"{res.spill_bytes} B of register spills")
    return res


def all_specs() -> list[CompileSpec]:
    from . import adapter_attention, gated_fusion, linear, norms, paged_attention, rotary_cache
    modules = (linear, adapter_attention, gated_fusion, norms, rotary_cache, paged_attention)
    return [s for mod in modules for s in mod.compile_specs()]


def _compile_job(job: tuple[int, str]) -> CompileResult:
    index, target = job
    return compile_spec(all_specs()[index], target)


def compile_all(kernels: list[str] | None = None, targets: list[str] | None = None,
                workers: int | None = None) -> list[CompileResult]:
    """Compile every spec (optionally only some kernels / targets) in fresh worker processes.

    Workers are spawned without TRITON_INTERPRET: under the interpreter @triton.jit functions
    cannot be compiled, and `make test` sets it on GPU-less machines.
    """
    specs = all_specs()
    jobs = [(i, t) for i, s in enumerate(specs) if not kernels or s.kernel in kernels for t in (targets or TARGETS)]
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers or min(4, os.cpu_count() or 1)) as pool:
            return pool.map(_compile_job, jobs, chunksize=4)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def format_table(results: list[CompileResult]) -> str:
    rows = [f"{'kernel':<28} {'config':<38} {'target':<6} {'regs':>5} {'spill':>6} {'smem':>7} {'limit':>7}  status"]
    for r in results:
        rows.append(f"{r.kernel:<28} {r.label:<38} {r.target:<6} {r.registers:>5} {r.spill_bytes:>6} "
                    f"{r.shared:>7} {r.shared_limit:>7}  {'ok' if r.ok else '; '.join(r.errors)}")
    return "\n".join(rows)
