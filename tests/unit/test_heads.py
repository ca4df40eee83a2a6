"""DINOHead: checkpoint-compatible keys, weight normalisation and gradient flow."""

import pytest
import torch

from reddino.ssl.heads import DINOHead, WeightNormLinear, is_last_layer_param

IN_DIM, OUT_DIM, HIDDEN, BOTTLENECK = 12, 40, 24, 8


def _head(nlayers: int = 3) -> DINOHead:
    torch.manual_seed(0)
    return DINOHead(IN_DIM, OUT_DIM, HIDDEN, BOTTLENECK, nlayers)


def test_output_shape():
    assert _head()(torch.randn(5, IN_DIM)).shape == (5, OUT_DIM)


def test_state_dict_keys_match_dinov2_checkpoints():
    expected = {f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")} | {
        "last_layer.weight_g",
        "last_layer.weight_v",
    }
    sd = _head().state_dict()
    assert set(sd) == expected
    assert sd["last_layer.weight_g"].shape == (OUT_DIM, 1)
    assert sd["last_layer.weight_v"].shape == (OUT_DIM, BOTTLENECK)


def test_single_layer_mlp_is_bare_linear_like_upstream():
    head = _head(nlayers=1)
    assert set(head.state_dict()) == {"mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"}
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(IN_DIM, OUT_DIM, HIDDEN, BOTTLENECK, 0)


def test_init_trunc_normal_and_zero_bias_and_unit_g():
    head = DINOHead(256, OUT_DIM, 512, BOTTLENECK, 3)
    w = head.mlp[2].weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert w.abs().max().item() < 0.1  # truncated, nothing far in the tails
    assert all(torch.count_nonzero(head.mlp[i].bias) == 0 for i in (0, 2, 4))
    assert torch.equal(head.last_layer.weight_g, torch.ones(OUT_DIM, 1))


def test_last_layer_rows_have_norm_g():
    layer = WeightNormLinear(BOTTLENECK, OUT_DIM)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 3.0)
    row_norms = layer.weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(row_norms, layer.weight_g.detach())
    x = torch.randn(3, BOTTLENECK)
    v = layer.weight_v.detach()
    expected = x @ (layer.weight_g.detach() * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(layer(x), expected)


def test_bottleneck_is_l2_normalised_before_prototypes():
    head = _head()
    x = torch.randn(6, IN_DIM)
    captured = {}
    head.last_layer.register_forward_pre_hook(lambda _m, args: captured.setdefault("z", args[0]))
    head(x)
    torch.testing.assert_close(captured["z"].norm(dim=-1), torch.ones(6))
    # scaling the MLP output must not change the logits
    with torch.no_grad():
        head.mlp[4].weight.mul_(7.0)
        head.mlp[4].bias.mul_(7.0)
    torch.testing.assert_close(head(x), head.last_layer(captured["z"]))


def test_gradients_reach_weight_g_and_weight_v():
    head = _head()
    head(torch.randn(4, IN_DIM)).pow(2).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_last_layer_params_are_identified():
    head = _head()
    flagged = {n for n, _ in head.named_parameters() if is_last_layer_param(n)}
    assert flagged == {"last_layer.weight_g", "last_layer.weight_v"}
    assert {id(p) for p in head.last_layer_parameters()} == {
        id(head.last_layer.weight_g),
        id(head.last_layer.weight_v),
    }


def test_half_precision_eps_keeps_zero_input_finite():
    # with eps 1e-12 (underflows to 0 in float16) a zero bottleneck would give 0/0 = NaN
    head = _head().to(torch.float16)
    with torch.no_grad():
        for i in (0, 2, 4):
            head.mlp[i].weight.zero_()
    assert torch.isfinite(head(torch.randn(2, IN_DIM, dtype=torch.float16))).all()
