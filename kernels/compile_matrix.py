"""Compile every kernel for real GPUs on a GPU-less machine and read back what decides its speed.

The kernel modules listed in MODULES give `compile_specs()`: one `CompileSpec` (kernels/specs.py)
per (config its launcher can pick, dtype, variant), with the argument values a launch at the real
model shapes passes. `specialize` turns those values into what Triton's launcher would compile
(types; ints divisible by 16 or equal to 1; 16-byte aligned pointers), `compile_spec` builds it with
`triton.compile` for an explicit `GPUTarget`, reads registers / spills / shared memory from the cubin
with the tools Triton ships, and counts the PTX instructions that decide speed (`ptx_facts`).
"""
from __future__ import annotations

import contextlib
import importlib
import io
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
# The modules (under autoglm_fast.kernels) whose compile_specs() the matrix compiles.
MODULES = ("linear", "adapter_attention", "gated_fusion", "norms", "rotary_cache", "paged_attention", "paged_decode",
           "vision_rope", "swiglu_down", "quant_gemv", "quant_gemm")
# What the report (compile_report --json) holds per kernel x config x target, in this order.
REPORT_KEYS = ("kernel", "config", "target", "registers", "spill_bytes", "smem_bytes", "global_loads",
               "global_stores", "mma", "cp_async", "tma")


@dataclass
class CompileResult:  # plain data, so results can come back from worker processes
    kernel: str
    config: str
    target: str
    registers: int = 0
    spill_bytes: int = 0   # ptxas's spill stores per thread: > 0 means register spills
    smem_bytes: int = 0
    global_loads: dict[str, int] = field(default_factory=dict)   # access width in bits -> PTX instructions
    global_stores: dict[str, int] = field(default_factory=dict)
    mma: str = "none"      # "wgmma", "mma.sync" or "none"
    cp_async: int = 0      # cp.async copies (Ampere-style async global -> shared)
    tma: int = 0           # cp.async.bulk copies (Hopper's TMA)
    smem_limit: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in REPORT_KEYS}


# ---- what a launch compiles -----------------------------------------------------------------------
def _jit(fn):
    """The JITFunction behind a spec's kernel (autotuners unwrapped; under TRITON_INTERPRET, where
    @triton.jit gives interpreter functions, a JITFunction of the same Python function)."""
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    return fn if isinstance(fn, triton.runtime.JITFunction) else triton.runtime.JITFunction(fn.fn)


def _specialize_arg(value, param) -> tuple[str, object]:
    """(type, attribute) of one argument as Triton's launcher derives it: ints equal to 1 become
    constants, ints divisible by 16 and 16-byte aligned pointers get "D" (tt.divisibility 16);
    floats and bools are not specialized."""
    if param.is_constexpr:
        return "constexpr", value
    specialize, align = not param.do_not_specialize, not param.do_not_specialize_on_alignment
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        kind = "i32" if -2**31 <= value < 2**31 else "u64" if value >= 2**63 else "i64"
        return kind, "D" if specialize and value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    if hasattr(value, "data_ptr"):
        kind = ("*k" if param.is_const else "*") + value.dtype
        return kind, "D" if align and value.data_ptr() % 16 == 0 else ""
    raise TypeError(f"cannot specialize argument {param.name}={value!r}")


def _portable_specialization(fn, args: dict) -> tuple[dict, dict, dict]:
    specialization = [_specialize_arg(args[p.name], p) for p in fn.params]
    signature = {p.name: kind for p, (kind, _) in zip(fn.params, specialization)}
    constexprs = {(i,): v for i, (kind, v) in enumerate(specialization) if kind == "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (kind, a) in enumerate(specialization)
             if kind != "constexpr" and a == "D"}
    return signature, constexprs, attrs


def specialize(spec, cc: int = 90, portable: bool = False) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource: what `kernel[grid](**spec.args)` compiles.

    Runs Triton's own launcher code (the argument binder and `_pack_args` of Triton 3.6-3.9); where
    that API is missing, `_specialize_arg`'s copy of its rules (the tests check the two agree)."""
    fn = _jit(spec.fn)
    missing, unknown = set(fn.arg_names) - set(spec.args), set(spec.args) - set(fn.arg_names)
    if missing or unknown:
        raise ValueError(f"{spec.kernel} [{spec.label}]: compile spec lacks arguments {sorted(missing)}, "
                         f"has unknown ones {sorted(unknown)}")
    if not portable:
        try:
            from triton.compiler import make_backend
            from triton.runtime.jit import create_function_from_signature
            backend = make_backend(GPUTarget("cuda", cc, 32))
            bound, specialization, opts = create_function_from_signature(fn.signature, fn.params, backend)(
                **spec.args, **spec.options)
            _, signature, constexprs, attrs = fn._pack_args(backend, spec.options, bound, specialization, opts)
            return signature, constexprs, {k: v for k, v in attrs.items() if v}
        except (ImportError, AttributeError, TypeError):
            pass
    return _portable_specialization(fn, spec.args)


def _ast_source(spec, cc: int) -> ASTSource:
    signature, constexprs, attrs = specialize(spec, cc)
    return ASTSource(fn=_jit(spec.fn), signature=signature, constexprs=constexprs, attrs=attrs)


# ---- what decides speed, read from the PTX --------------------------------------------------------
_GLOBAL_ACCESS = re.compile(r"^\s*(?:@!?%\w+\s+)?(ld|st)\.global((?:\.[\w:]+)*)\s")
_CP_ASYNC = re.compile(r"^\s*(?:@!?%\w+\s+)?cp\.async\.(?!bulk|commit_group|wait_group|wait_all|mbarrier)")
_TMA = re.compile(r"^\s*(?:@!?%\w+\s+)?cp\.async\.bulk\.(?!commit_group|wait_group)")


def _access_bits(modifiers: str) -> int:
    parts = modifiers.split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
    bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bsuf]\d+", p)), 0)
    return lanes * bits


def ptx_facts(ptx: str) -> dict:
    """Static counts in the PTX: global loads (ld.global, incl. .nc and predicated) and stores by
    access width in bits (v4.b32 = 128), the MMA kind, cp.async copies and TMA (cp.async.bulk) copies."""
    loads: dict[str, int] = {}
    stores: dict[str, int] = {}
    cp_async = tma = 0
    for line in ptx.splitlines():
        line = line.split("//", 1)[0]
        if m := _GLOBAL_ACCESS.match(line):
            counts = loads if m.group(1) == "ld" else stores
            bits = str(_access_bits(m.group(2)))
            counts[bits] = counts.get(bits, 0) + 1
        cp_async += bool(_CP_ASYNC.match(line))
        tma += bool(_TMA.match(line))
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if re.search(r"\bmma\.sync\b", ptx) else "none"
    by_width = lambda d: dict(sorted(d.items(), key=lambda kv: int(kv[0])))  # noqa: E731
    return {"global_loads": by_width(loads), "global_stores": by_width(stores), "mma": mma,
            "cp_async": cp_async, "tma": tma}


# ---- resources, from the cubin ---------------------------------------------------------------------
def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _spills_in(ptxas_log: str) -> int | None:
    found = re.findall(r"(\d+) bytes spill stores", ptxas_log)
    return sum(map(int, found)) if found else None


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
    return _spills_in(out.stdout + out.stderr) if out.returncode == 0 else None


@contextlib.contextmanager
def _ptxas_log():
    """Have Triton print the log of its own `ptxas -v` run (TRITON_DUMP_PTXAS_LOG) and capture it:
    no second ptxas run, and the flags Triton really uses. Empty when the kernel came from the cache."""
    log, saved = io.StringIO(), os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(log):
            yield log
    finally:
        if saved is None:
            del os.environ["TRITON_DUMP_PTXAS_LOG"]
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = saved


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def compile_spec(spec, target: str) -> CompileResult:
    cc, limit = TARGETS[target]
    res = CompileResult(spec.kernel, spec.label, target, smem_limit=limit)
    try:
        with _ptxas_log() as log:
            k = triton.compile(_ast_source(spec, cc), target=GPUTarget("cuda", cc, 32), options=spec.options)
    except Exception as e:  # compile failures are results too: report them per target
        res.errors.append(f"compile failed: {type(e).__name__}: {e}")
        return res
    usage = resource_usage(k.asm["cubin"])
    spills = _spills_in(log.getvalue())
    if spills is None:  # a cached kernel: run ptxas -v ourselves
        spills = spill_bytes(k.asm["ptx"], cc)
    if spills is None:  # no usable ptxas: local memory is the conservative stand-in
        spills = usage.get("LOCAL", 0) + usage.get("STACK", 0)
    res.registers, res.spill_bytes = usage.get("REG", 0), spills
    res.smem_bytes = max(int(k.metadata.shared), usage.get("SHARED", 0))
    for key, value in ptx_facts(k.asm["ptx"]).items():
        setattr(res, key, value)
    if res.smem_bytes > limit:
        res.errors.append(f"shared memory {res.smem_bytes} B > {limit} B")
    if spec.hot and res.spill_bytes:
        res.errors.append(f"{res.spill_bytes} B of register spills")
    return res


# ---- the matrix ------------------------------------------------------------------------------------
def all_specs() -> list:
    mods = [importlib.import_module(f"{__package__}.{name}") for name in MODULES]
    return [s for mod in mods for s in mod.compile_specs()]


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
    jobs = [(i, t) for i, s in enumerate(specs) if not kernels or s.kernel in kernels for t in (targets or TARGETS)
            if s.targets is None or t in s.targets]
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers or min(4, os.cpu_count() or 1)) as pool:
            return pool.map(_compile_job, jobs, chunksize=4)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _widths(counts: dict[str, int]) -> str:
    return " ".join(f"{n}x{bits}" for bits, n in counts.items()) or "-"


def format_table(results: list[CompileResult]) -> str:
    """One row per kernel x config x target. ld/st: PTX global loads/stores as count x bits."""
    head = (f"{'kernel':<24} {'config':<36} {'target':<6} {'regs':>4} {'spill':>5} {'smem':>6} {'limit':>6} "
            f"{'ld (n x bits)':<22} {'st (n x bits)':<16} {'mma':<8} {'cp.as':>5} {'tma':>3}  status")
    rows = [head]
    for r in results:
        rows.append(f"{r.kernel:<24} {r.config:<36} {r.target:<6} {r.registers:>4} {r.spill_bytes:>5} "
                    f"{r.smem_bytes:>6} {r.smem_limit:>6} {_widths(r.global_loads):<22} "
                    f"{_widths(r.global_stores):<16} {r.mma:<8} {r.cp_async:>5} {r.tma:>3}  "
                    f"{'ok' if r.ok else '; '.join(r.errors)}")
    return "\n".join(rows)
