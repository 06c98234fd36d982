"""torch.compile(fullgraph=True) of the whole UNet with fastdiff's custom ops inside."""
import pytest
import torch

from fastdiff import config as C
from fastdiff.train.parallel import DistInfo, parallelize


def tiny(norm_backend, attention_backend):
    kw = C.model_and_diffusion_defaults()
    kw.update(image_size=8, num_channels=64, num_res_blocks=1, channel_mult="1,2",
              attention_resolutions="2", num_heads=2, class_cond=True, learn_sigma=True,
              use_checkpoint=True)
    torch.manual_seed(0)
    model, _ = C.create_model_and_diffusion(**kw, norm_backend=norm_backend,
                                            attention_backend=attention_backend)
    return model


@pytest.mark.slow
def test_unet_with_custom_ops_compiles_fullgraph_and_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    eager = tiny("fused", "triton")
    compiled = tiny("fused", "triton")
    compiled.load_state_dict(eager.state_dict())
    with torch.no_grad():  # non-zero output convs so every gradient is meaningful
        for (_, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
            if not p.any():
                p.normal_(0, 0.05)
                q.copy_(p)
    compiled_fn = torch.compile(compiled, fullgraph=True)  # a graph break raises here
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 900])
    y = torch.tensor([1, 7])
    out_e = eager(x, t, y)
    out_c = compiled_fn(x, t, y)
    assert torch.allclose(out_c, out_e, rtol=1e-4, atol=1e-5)
    out_e.square().mean().backward()
    out_c.square().mean().backward()
    # Judged against the largest gradient: a bias feeding a GroupNorm has a (near-)zero
    # gradient made of rounding noise, which no relative tolerance of its own can judge.
    scale = max(float(p.grad.abs().max()) for p in eager.parameters())
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-3, atol=1e-5 * scale), name


def test_parallelize_compiles_in_place_keeping_state_dict_keys():
    model = tiny("fused", "triton")
    keys = list(model.state_dict())
    desc = parallelize(model, DistInfo(), "fp32", compile=True)
    assert "torch.compile whole model" in desc and "single process" in desc
    assert list(model.state_dict()) == keys
