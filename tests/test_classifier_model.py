"""The classifier's two unusual kernel inputs, through the Triton kernels themselves.

GD's classifier feeds fastdiff's kernels two shapes the UNet never does: AttentionPool2d
attends over HW + 1 tokens (an odd length, not a multiple of any block size), and the
spatial_v2 head normalises a [N, 2048] vector (no spatial dims: the fused GroupNorm sees
one element per channel). On the CPU the goldens (test_gd_golden_classifier.py) run the
ops' torch fallbacks; here the Triton kernels run under the interpreter (TRITON_INTERPRET=1
must be set before triton is imported, hence a child process, as
tests/test_interpreted_kernels.py does) and must match GD's modules in output and input
gradient. Kept to those two modules: a whole classifier takes minutes interpreted.
"""
import os
import subprocess
import sys
import textwrap

# Interpreted fp32 kernels reorder sums: measured ≤ 1e-6 on outputs and input gradients of
# size ~1; a wrong mask on the odd token or a wrong group size is O(1e-1).
ATOL = 1e-5

CHILD = textwrap.dedent(f"""
    import torch
    import torch.nn as nn
    from fastdiff.models.classifier import AttentionPool2d
    from fastdiff.models.layers import GroupNorm32, GroupNormAct

    def run(module, x):
        x = x.clone().requires_grad_(True)
        out = module(x)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        return out.detach(), torch.autograd.grad((out * weights).sum(), x)[0]

    def compare(name, got, ref):
        for what, a, b in zip(("output", "input grad"), got, ref):
            err = float((a - b).abs().max())
            assert err <= {ATOL}, f"{{name}} {{what}}: {{err:.3g}}"
            print(name, what, f"{{err:.2g}}")

    torch.manual_seed(0)
    # 4x4 + 1 = 17 tokens, 2 heads of 32 channels, as the classifier's attention head.
    reference = AttentionPool2d(4, 64, 32, output_dim=5)
    pool = AttentionPool2d(4, 64, 32, output_dim=5, attention_backend="triton")
    pool.load_state_dict(reference.state_dict())
    assert pool.attention.backend == "triton"
    tokens = torch.randn(2, 64, 4, 4)
    compare("attention pool", run(pool, tokens), run(reference, tokens))

    # spatial_v2: GroupNorm32(32, 2048) + SiLU over [N, 2048].
    norm = GroupNorm32(32, 2048)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(2048))
        norm.bias.add_(0.1 * torch.randn(2048))
    features = torch.randn(2, 2048)
    compare("spatial_v2 norm", run(GroupNormAct.from_group_norm(norm, act=True), features),
            run(nn.Sequential(norm, nn.SiLU()), features))
""")


def test_attention_pool_and_2d_group_norm_through_interpreted_triton():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("\n") == 4, proc.stdout
