"""Shared by the test_triton_compile_* modules: compile a Triton kernel for a GPU target on
this CPU machine (no GPU needed) and check the shared memory its programs ask for."""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Usable shared memory per block: 228 KB (H100) and 164 KB (A100) less 1 KB reserved.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def jit_function(module, name):
    """The @triton.jit function ``name`` of ``module``, under any autotune/heuristics wrappers."""
    fn = getattr(module, name)
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    return fn


def compile_for_gpu(fn, name, signature, constants, attrs, constexprs, arch, **options):
    """triton.compile ``fn`` to a cubin for sm_``arch``; assert that every constexpr has a
    value, that a cubin came out, and that its shared memory fits the chip."""
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constants]
    assert not missing, f"{name}: no value for constexpr {missing}"
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    assert compiled.asm.get("cubin"), f"{name}: no cubin produced"
    assert compiled.metadata.shared <= SHARED_LIMIT[arch], (
        f"{name} {constexprs} num_warps={options.get('num_warps')}: {compiled.metadata.shared} B "
        f"of shared memory > {SHARED_LIMIT[arch]} B on sm_{arch}")
    return compiled
