"""torch.ops.fastdiff.adam_ema_ / grad_norm_sq and fastdiff.optim.FusedAdamEMA.

References: torch.optim.AdamW for the update (fp32, rtol 1e-6, atol 1e-7: FMA contraction
and vectorisation make bitwise equality too strict), float64 AdamW as the higher-precision
reference, guided-diffusion's EMA loop (ema.mul_(rate).add_(p, alpha=1 - rate)),
GradScaler-style unscaling and torch.nn.utils.clip_grad_norm_. Every optimizer test runs on
both backends: the C++ extension and the pure-torch foreach fallback.
"""
import io
import logging
import shutil

import pytest
import torch

from fastdiff.optim import FusedAdamEMA, _ext, clip_factor_from_norm
from fastdiff.optim import fused_adam_ema

RTOL, ATOL = 1e-6, 1e-7
# Not multiples of the vector width; 65537 crosses a CPU chunk boundary; 0 and 1 included.
SHAPES = [(0,), (1,), (3,), (7,), (17, 33), (4097,), (65537,)]
RATES = (0.99, 0.9)
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


@pytest.fixture(scope="module")
def extension():
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the extension cannot be built here")
    assert _ext.extension_available(), "the C++ extension did not build (see the log)"


@pytest.fixture(params=["extension", "foreach"])
def backend(request):
    if request.param == "extension":
        request.getfixturevalue("extension")
    return request.param


def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) + 0.5).to(dtype)) for s in shapes]


def random_grads(params, gen, scale=1.0, dtype=None):
    return [((torch.randn(p.shape, generator=gen) + 0.3) * scale).to(dtype or p.dtype)
            for p in params]


def clone_params(params, dtype=torch.float32):
    return [torch.nn.Parameter(p.detach().to(dtype, copy=True)) for p in params]


def gd_ema_update(emas, params, rate):
    for ema, p in zip(emas, params):
        ema.mul_(rate).add_(p.detach(), alpha=1 - rate)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.detach(), e.detach().to(a.dtype), rtol=rtol, atol=atol)


def assert_bitwise_equal(actual, expected):
    """Same dtype, shape and bytes (NaN payloads and signed zeros included)."""
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), e.reshape(-1).view(torch.uint8))


def optimizer_tensors(opt):
    """Every tensor a step may write: params, masters and all state, in a fixed order."""
    out = []
    for p in (q for group in opt.param_groups for q in group["params"]):
        out.append(p.detach())
        out.extend(opt.state[p][k] for k in sorted(opt.state[p]))
    return [t.clone() for t in out]


# ---- parity with torch.optim.AdamW + guided-diffusion's EMA ----------------------------
def test_matches_torch_adamw_and_gd_ema_over_20_steps(backend):
    params = make_params(SHAPES)
    ref = clone_params(params)
    # Two groups with different hyperparameters exercise per-group calls.
    opt = FusedAdamEMA([{"params": params[:4]}, {"params": params[4:], "lr": 3e-4,
                                                  "weight_decay": 0.0}],
                       ema_rates=RATES, backend=backend, **HYPER)
    ref_opt = torch.optim.AdamW([{"params": ref[:4]}, {"params": ref[4:], "lr": 3e-4,
                                                       "weight_decay": 0.0}], **HYPER)
    ref_emas = {rate: [p.detach().clone() for p in ref] for rate in RATES}
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        for p, r, g in zip(params, ref, random_grads(params, gen)):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        for rate in RATES:
            gd_ema_update(ref_emas[rate], ref, rate)
    assert_close(params, ref)
    assert_close([opt.state[p]["exp_avg"] for p in params],
                 [ref_opt.state[r]["exp_avg"] for r in ref])
    assert_close([opt.state[p]["exp_avg_sq"] for p in params],
                 [ref_opt.state[r]["exp_avg_sq"] for r in ref])
    for rate in RATES:
        assert_close(opt.get_ema(rate), ref_emas[rate])
    assert all(opt.state[p]["step"].item() == 20 for p in params)
    assert not opt.last_step_skipped


def test_close_to_float64_adamw(backend):
    params = make_params(SHAPES[:6])
    ref = clone_params(params, torch.float64)
    opt = FusedAdamEMA(params, ema_rates=(), backend=backend, **HYPER)
    ref_opt = torch.optim.AdamW(ref, **HYPER)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        for p, r, g in zip(params, ref, random_grads(params, gen)):
            p.grad, r.grad = g.clone(), g.double()
        opt.step()
        ref_opt.step()
    assert_close(params, ref, rtol=1e-5, atol=1e-6)
    assert_close([opt.state[p]["exp_avg_sq"] for p in params],
                 [ref_opt.state[r]["exp_avg_sq"] for r in ref], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_master_and_copy(backend, dtype):
    params = make_params(SHAPES, dtype)
    masters = clone_params(params)  # fp32 reference masters, same starting values
    opt = FusedAdamEMA(params, ema_rates=RATES[:1], backend=backend, **HYPER)
    ref_opt = torch.optim.AdamW(masters, **HYPER)
    ref_ema = [m.detach().clone() for m in masters]
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        for p, m, g in zip(params, masters, random_grads(params, gen)):
            p.grad, m.grad = g, g.float()
        opt.step()
        ref_opt.step()
        gd_ema_update(ref_ema, masters, RATES[0])
    assert all(opt.state[p]["master"].dtype == torch.float32 for p in params)
    assert_close(opt.master_params(), masters)
    assert_close(opt.get_ema(RATES[0]), ref_ema)
    # The model copy is the kernel's own master rounded once (round to nearest even).
    assert_bitwise_equal([p.detach() for p in params],
                         [m.to(dtype) for m in opt.master_params()])


# ---- loss scaling, skipping, clipping ---------------------------------------------------
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_grad_skips_step_bit_exactly(backend, bad):
    params = make_params(SHAPES) + make_params([(5,)], torch.bfloat16, seed=4)
    ref = clone_params(params)
    opt = FusedAdamEMA(params, ema_rates=RATES, backend=backend, **HYPER)
    ref_opt = torch.optim.AdamW(ref, **HYPER)
    scale = 1024.0
    gen = torch.Generator().manual_seed(5)

    def good_step():
        grads = random_grads(params, gen, scale=scale)
        for p, r, g in zip(params, ref, grads):
            p.grad, r.grad = g, g.float() / scale
        opt.step(loss_scale=scale)
        ref_opt.step()
        assert not opt.last_step_skipped

    good_step()
    before = optimizer_tensors(opt)
    grads = random_grads(params, gen, scale=scale)
    grads[5].view(-1)[1234] = bad
    for p, g in zip(params, grads):
        p.grad = g
    opt.step(loss_scale=scale)
    assert opt.last_step_skipped
    assert_bitwise_equal(optimizer_tensors(opt), before)
    good_step()
    assert_close(opt.master_params(), ref)
    assert all(opt.state[p]["step"].item() == 2 for p in params)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping active / inactive
def test_clipping_matches_clip_grad_norm(backend, max_norm):
    params = make_params(SHAPES)
    ref = clone_params(params)
    opt = FusedAdamEMA(params, ema_rates=RATES[:1], backend=backend, **HYPER)
    ref_opt = torch.optim.AdamW(ref, **HYPER)
    scale = 256.0
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        for p, r, g in zip(params, ref, random_grads(params, gen, scale=scale)):
            p.grad, r.grad = g, g * (1.0 / scale)  # GradScaler multiplies by 1/scale
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt.step(loss_scale=scale, max_grad_norm=max_norm)
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm, ref_norm, rtol=RTOL, atol=0)
    assert_close(params, ref)


def test_found_inf_and_clip_factor_passed_as_tensors(backend):
    params = make_params(SHAPES[:5])
    ref = clone_params(params)
    opt = FusedAdamEMA(params, backend=backend, **HYPER)
    ref_opt = torch.optim.AdamW(ref, **HYPER)
    gen = torch.Generator().manual_seed(7)
    grads = random_grads(params, gen)
    for p, g in zip(params, grads):
        p.grad = g
    before = optimizer_tensors(opt)
    opt.step(found_inf=torch.ones(()))
    assert opt.last_step_skipped
    assert_bitwise_equal(optimizer_tensors(opt), before)

    # clip_grad_norm_ adds 1e-6 to the norm: visible at tiny norms; never amplifies.
    assert clip_factor_from_norm(torch.tensor(1e-6), 1e-6).item() == pytest.approx(0.5)
    assert clip_factor_from_norm(torch.tensor(0.5), 2.0).item() == 1.0
    factor = clip_factor_from_norm(torch.tensor(8.0), 2.0)
    for r, g in zip(ref, grads):
        r.grad = g * factor
    opt.step(found_inf=torch.zeros(()), clip_factor=factor)
    ref_opt.step()
    assert not opt.last_step_skipped
    assert_close(params, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_norm_sq_op_matches_float64(extension, dtype):
    gen = torch.Generator().manual_seed(8)
    grads = [(torch.randn(s, generator=gen) + 0.3).to(dtype) for s in SHAPES]
    inv_scale = torch.tensor(1.0 / 64)
    expected = sum(((g.double() * inv_scale.double()) ** 2).sum() for g in grads)
    sum_sq, found_inf = torch.ops.fastdiff.grad_norm_sq(grads, inv_scale)
    assert sum_sq.dtype == torch.float32 and found_inf.item() == 0.0
    torch.testing.assert_close(sum_sq.double(), expected, rtol=1e-6, atol=0)
    # Fixed chunking: the value does not depend on the thread count.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single, _ = torch.ops.fastdiff.grad_norm_sq(grads, inv_scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, sum_sq)
    foreach_sum_sq, _ = fused_adam_ema.grad_norm_sq_foreach(grads, inv_scale)
    torch.testing.assert_close(foreach_sum_sq.double(), expected, rtol=1e-6, atol=0)
    for index in (0, 4096, 65536):  # first element, vector tail, last chunk
        bad = [g.clone() for g in grads]
        bad[-1 if index == 65536 else 5][index] = float("nan")
        assert torch.ops.fastdiff.grad_norm_sq(bad, None)[1].item() == 1.0


# ---- state, EMAs, odd inputs -------------------------------------------------------------
def test_state_dict_round_trip_continues_identically(backend):
    shapes = SHAPES[:6]
    params = make_params(shapes) + make_params([(9,), (4, 4)], torch.bfloat16, seed=9)
    opt = FusedAdamEMA(params, ema_rates=RATES, backend=backend, **HYPER)
    gen = torch.Generator().manual_seed(10)
    for _ in range(3):
        for p, g in zip(params, random_grads(params, gen)):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = FusedAdamEMA(copies, ema_rates=RATES, backend=backend, lr=0.5)
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.param_groups[0]["lr"] == HYPER["lr"]
    assert fresh.state[copies[-1]]["master"].dtype == torch.float32
    assert_bitwise_equal(optimizer_tensors(fresh), optimizer_tensors(opt))
    for _ in range(3):
        for p, c, g in zip(params, copies, random_grads(params, gen)):
            p.grad, c.grad = g, g.clone()
        opt.step()
        fresh.step()
    assert_bitwise_equal(optimizer_tensors(fresh), optimizer_tensors(opt))

    other_rates = FusedAdamEMA(clone_params(params[:6]) + clone_params(params[6:]),
                               ema_rates=(0.5,), backend=backend)
    with pytest.raises(ValueError, match="rates"):
        other_rates.load_state_dict(opt.state_dict())


def test_get_ema_order_and_unknown_rate(backend):
    params = make_params(SHAPES[:4])
    opt = FusedAdamEMA(params, ema_rates=RATES, backend=backend)
    emas = opt.get_ema(RATES[1])
    assert [e.shape for e in emas] == [p.shape for p in params]
    assert all(torch.equal(e, p.detach()) for e, p in zip(emas, params))  # start as copies
    assert opt.get_ema(str(RATES[0]))[0] is opt.state[params[0]]["ema0"]
    with pytest.raises(ValueError, match="no EMA with rate 0.5"):
        opt.get_ema(0.5)


def test_param_without_grad_is_not_stepped_but_its_ema_moves(backend):
    params = make_params([(5,), (6,)])
    opt = FusedAdamEMA(params, ema_rates=RATES[:1], backend=backend, **HYPER)
    with torch.no_grad():
        opt.get_ema(RATES[0])[1].zero_()  # make the EMA differ from the parameter
    frozen = params[1].detach().clone()
    params[0].grad = torch.randn(5)
    opt.step()
    assert torch.equal(params[1].detach(), frozen)
    assert opt.state[params[1]]["step"].item() == 0
    expected = torch.zeros(6).mul_(RATES[0]).add_(frozen, alpha=1 - RATES[0])
    torch.testing.assert_close(opt.get_ema(RATES[0])[1], expected, rtol=RTOL, atol=ATOL)
    before = opt.get_ema(RATES[0])[1].clone()
    opt.step(found_inf=torch.ones(()))  # skipped: the frozen parameter's EMA stays
    assert torch.equal(opt.get_ema(RATES[0])[1], before)


def test_loss_scale_step_reports_norm_and_handles_no_grads(backend):
    params = make_params([(5,), (6,)])
    opt = FusedAdamEMA(params, ema_rates=RATES[:1], backend=backend, **HYPER)
    opt.step(loss_scale=8.0)  # no gradient at all: nothing to unscale, nothing skipped
    assert not opt.last_step_skipped and opt.last_grad_norm.item() == 0.0
    grads = [torch.randn(5), torch.randn(6)]
    for p, g in zip(params, grads):
        p.grad = g * 8.0
    opt.step(loss_scale=8.0)
    expected = torch.cat(grads).double().norm()
    torch.testing.assert_close(opt.last_grad_norm.double(), expected, rtol=RTOL, atol=0)
    opt.step(loss_scale=8.0, found_inf=torch.zeros(()))  # norm not needed: not computed
    assert opt.last_grad_norm is None


def test_op_handles_empty_lists_and_tensors(extension):
    op = torch.ops.fastdiff.adam_ema_
    lr = torch.tensor(1e-3)
    op([], [], [], [], [], [], [], lr, 0.9, 0.999, 1e-8, 0.0, [0.99])
    p, g = torch.empty(0), torch.empty(0)
    step = torch.zeros(())
    op([p], [g], [torch.empty(0)], [torch.empty(0)], [torch.empty(0)], [], [step], lr,
       0.9, 0.999, 1e-8, 0.0, [0.99])
    assert step.item() == 1.0


def _op_args(**overrides):
    n = 6
    args = dict(params=[torch.randn(n)], grads=[torch.randn(n)], exp_avgs=[torch.zeros(n)],
                exp_avg_sqs=[torch.zeros(n)], emas=[torch.zeros(n)], model_params=[],
                steps=[torch.zeros(())], lr=torch.tensor(1e-3), beta1=0.9, beta2=0.999,
                eps=1e-8, weight_decay=0.0, ema_rates=[0.99])
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, message", [
    (dict(params=[torch.randn(6, 2).t()], grads=[torch.randn(2, 6)],
          exp_avgs=[torch.zeros(2, 6)], exp_avg_sqs=[torch.zeros(2, 6)],
          emas=[torch.zeros(2, 6)]), ValueError, r"params\[0\] is not contiguous"),
    (dict(grads=[torch.randn(12)[::2]]), ValueError, r"grads\[0\] is not contiguous"),
    (dict(exp_avgs=[torch.zeros(6, device="meta")]), ValueError, r"exp_avgs\[0\] is on meta"),
    (dict(grads=[torch.randn(6, dtype=torch.float64)]), TypeError, r"grads\[0\] has dtype"),
    (dict(params=[torch.randn(6).half()]), TypeError, r"params\[0\] has dtype"),
    (dict(grads=[torch.randn(7)]), ValueError, r"grads\[0\] has shape"),
    (dict(grads=[]), ValueError, "same length"),
    (dict(emas=[]), ValueError, "emas must hold"),
    (dict(model_params=[torch.zeros(6)]), TypeError, r"model_params\[0\] has dtype"),
    (dict(lr=torch.tensor(1e-3, dtype=torch.float64)), TypeError, "lr must be a float32"),
    (dict(ema_rates=[1.5]), ValueError, "outside"),
    (dict(ema_rates=[0.5] * 9, emas=[torch.zeros(6)] * 9), ValueError, "at most 8"),
])
def test_op_rejects_bad_inputs_with_clear_errors(extension, overrides, error, message):
    args = _op_args(**overrides)
    with pytest.raises(error, match=message):
        torch.ops.fastdiff.adam_ema_(*args.values())


def test_optimizer_rejects_bad_params_and_options(backend):
    with pytest.raises(TypeError, match="float64"):
        FusedAdamEMA([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], backend=backend)
    with pytest.raises(ValueError, match="ema_rates"):
        FusedAdamEMA(make_params([(3,)]), ema_rates=(1.2,), backend=backend)
    with pytest.raises(ValueError, match="either clip_factor or max_grad_norm"):
        FusedAdamEMA(make_params([(3,)]), backend=backend).step(
            clip_factor=torch.ones(()), max_grad_norm=1.0)


def test_optimizer_mixed_devices_clear_error(extension):
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))]
    opt = FusedAdamEMA(params, backend="extension")
    for p in params:
        p.grad = torch.randn(3, device=p.device)
    with pytest.raises(ValueError, match="is on meta"):
        opt.step()


def test_meta_kernels_check_and_write_nothing(extension):
    args = _op_args()
    meta = {k: ([t.to("meta") for t in v] if isinstance(v, list) and v and
                isinstance(v[0], torch.Tensor) else v.to("meta") if isinstance(v, torch.Tensor)
                else v) for k, v in args.items()}
    torch.ops.fastdiff.adam_ema_(*meta.values())
    sum_sq, found_inf = torch.ops.fastdiff.grad_norm_sq(meta["grads"], None)
    assert sum_sq.device.type == "meta" and sum_sq.shape == () and found_inf.shape == ()


# ---- backend selection and logging -------------------------------------------------------
def test_falls_back_to_foreach_with_one_warning(monkeypatch, caplog):
    def no_compiler():
        raise RuntimeError("no C++ compiler ('c++' not found)")

    monkeypatch.setattr(_ext, "_status", None)
    monkeypatch.setattr(_ext, "_load", no_compiler)
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        first = FusedAdamEMA(make_params([(3,)]))
        second = FusedAdamEMA(make_params([(3,)]))
    assert first.backend == second.backend == "foreach"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no C++ compiler" in warnings[0].getMessage()
    assert "foreach" in warnings[0].getMessage()
    assert any("pure-torch foreach path" in r.getMessage() for r in caplog.records
               if r.levelno == logging.INFO)
    with pytest.raises(RuntimeError, match="could not be built"):
        FusedAdamEMA(make_params([(3,)]), backend="extension")


def test_logs_which_path_runs(extension, caplog):
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        opt = FusedAdamEMA(make_params([(3,)]))
    assert opt.backend == "extension"
    assert any("C++/CUDA extension path" in r.getMessage() for r in caplog.records)


# ---- CUDA (run on a GPU machine) ---------------------------------------------------------
def _cuda_pair(shapes, dtype=torch.float32):
    params = [p.cuda() for p in make_params(shapes, dtype)]
    params = [torch.nn.Parameter(p.detach()) for p in params]
    return params, [torch.nn.Parameter(p.detach().float().clone()) for p in params]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_fused_adamw(extension, dtype):
    # 450 tensors overflow one kernel-argument table: several launches in one step.
    shapes = SHAPES + [(k % 37 + 1,) for k in range(450)]
    params, ref = _cuda_pair(shapes, dtype)
    opt = FusedAdamEMA(params, ema_rates=RATES, backend="extension", **HYPER)
    ref_opt = torch.optim.AdamW(ref, fused=True, **HYPER)
    ref_emas = {rate: [r.detach().clone() for r in ref] for rate in RATES}
    gen = torch.Generator().manual_seed(11)
    for _ in range(10):
        grads = [g.cuda() for g in random_grads(params, gen)]
        for p, r, g in zip(params, ref, grads):
            p.grad, r.grad = g, g.float()
        opt.step(loss_scale=2.0 ** 10)
        for r in ref:
            r.grad.mul_(2.0 ** -10)
        ref_opt.step()
        for rate in RATES:
            gd_ema_update(ref_emas[rate], ref, rate)
    # GPU FMA contraction differs from torch's kernels in the last bits.
    assert_close(opt.master_params(), ref, rtol=1e-5, atol=1e-6)
    for rate in RATES:
        assert_close(opt.get_ema(rate), ref_emas[rate], rtol=1e-5, atol=1e-6)
    if dtype != torch.float32:
        assert_bitwise_equal([p.detach() for p in params],
                             [m.to(dtype) for m in opt.master_params()])


@pytest.mark.gpu
def test_cuda_misaligned_tensors_use_scalar_path(extension):
    n = 1003
    base = [torch.randn(n + 1, device="cuda") for _ in range(5)]
    params, grads, m, v, ema = (b[1:] for b in base)  # 4-byte offset: not 16-byte aligned
    ref = [t.cpu().clone() for t in (params, grads, m, v, ema)]
    args = dict(lr=torch.tensor(1e-3), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                ema_rates=[0.9])
    step_gpu, step_cpu = torch.zeros((), device="cuda"), torch.zeros(())
    torch.ops.fastdiff.adam_ema_([params], [grads], [m], [v], [ema], [], [step_gpu],
                                 args["lr"].cuda(), 0.9, 0.999, 1e-8, 0.1, [0.9])
    torch.ops.fastdiff.adam_ema_([ref[0]], [ref[1]], [ref[2]], [ref[3]], [ref[4]], [],
                                 [step_cpu], args["lr"], 0.9, 0.999, 1e-8, 0.1, [0.9])
    assert_close([params.cpu(), m.cpu(), v.cpu(), ema.cpu()], [ref[0], ref[2], ref[3], ref[4]],
                 rtol=1e-5, atol=1e-6)
    assert step_gpu.item() == 1.0


@pytest.mark.gpu
def test_cuda_grad_norm_and_skip(extension):
    grads = [(torch.randn(s) + 0.3).cuda() for s in SHAPES]
    expected = sum((g.double() ** 2).sum() for g in grads)
    sum_sq, found_inf = torch.ops.fastdiff.grad_norm_sq(grads, None)
    torch.testing.assert_close(sum_sq.double(), expected, rtol=1e-6, atol=0)
    assert found_inf.item() == 0.0
    grads[-1][-1] = float("inf")
    assert torch.ops.fastdiff.grad_norm_sq(grads, None)[1].item() == 1.0

    params, _ = _cuda_pair(SHAPES)
    opt = FusedAdamEMA(params, ema_rates=RATES, backend="extension", **HYPER)
    for p, g in zip(params, grads):
        p.grad = g
    before = optimizer_tensors(opt)
    opt.step(loss_scale=128.0)
    assert opt.last_step_skipped
    assert_bitwise_equal(optimizer_tensors(opt), before)
