import pytest
import torch

from modules.mlp import MLP, Activation, Dice, PReLU


@pytest.mark.parametrize("activation", list(Activation))
def test_mlp_shapes_on_2d_and_3d_inputs(activation: Activation):
    mlp = MLP(6, [5, 4], out_features=2, activation=activation, dropout=0.1)
    assert mlp.out_features == 2
    mlp.eval()
    x = torch.randn(7, 3, 6)
    y = mlp(x)
    assert y.shape == (7, 3, 2)
    # Row-wise in eval mode: a 3-D input equals its flattened 2-D version.
    torch.testing.assert_close(y.reshape(-1, 2), mlp(x.reshape(-1, 6)))


def test_mlp_without_out_layer_ends_with_activation():
    mlp = MLP(3, [4], activation=Activation.relu)
    assert mlp.out_features == 4
    assert torch.all(mlp(torch.randn(10, 3)) >= 0)


def test_mlp_accepts_yaml_string_activation():
    assert isinstance(MLP(3, [4], activation="prelu").layers[1], PReLU)  # type: ignore[arg-type]


def test_prelu_slope_is_per_unit_of_last_dim():
    act = PReLU(3)
    with torch.no_grad():
        act.alpha.copy_(torch.tensor([0.0, 0.5, 1.0]))
    x = -torch.ones(2, 4, 3)
    torch.testing.assert_close(act(x), -torch.tensor([0.0, 0.5, 1.0]).expand(2, 4, 3))
    torch.testing.assert_close(act(-x), -x)


def test_dice_matches_formula_in_training():
    dice = Dice(3)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.1, 0.2, 0.3]))
    x = torch.randn(8, 3)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    p = torch.sigmoid((x - mean) / torch.sqrt(var + 1e-8))
    torch.testing.assert_close(dice(x), p * x + (1 - p) * dice.alpha * x)


def test_reset_parameters_restores_init_after_meta_materialisation():
    # DMP materialises a meta model with empty_like params and zero buffers, then calls reset_parameters.
    mlp = MLP(3, [4], activation=Activation.dice, device=torch.device("meta"))
    mlp.to_empty(device="cpu")
    for m in mlp.modules():
        for name, buf in m.named_buffers(recurse=False):
            buf.zero_()
    for m in mlp.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    dice = mlp.layers[1]
    assert torch.all(dice.alpha == 0) and torch.all(dice.norm.running_var == 1)
    prelu = MLP(3, [4], activation=Activation.prelu, device=torch.device("meta")).layers[1]
    prelu.to_empty(device="cpu")
    prelu.reset_parameters()
    assert torch.all(prelu.alpha == 0.25)


@pytest.mark.parametrize("activation", list(Activation))
def test_first_layer_as_a_sum_of_column_blocks(activation: Activation):
    torch.manual_seed(0)
    mlp = MLP(9, [5, 4], out_features=1, activation=activation).eval()
    parts = [torch.randn(6, 2), torch.randn(6, 3), torch.randn(6, 4)]
    blocks = mlp.first_blocks([2, 3, 4])
    assert [tuple(b.shape) for b in blocks] == [(5, 2), (5, 3), (5, 4)]
    h = sum(p @ b.t() for p, b in zip(parts, blocks)) + mlp.layers[0].bias
    torch.testing.assert_close(mlp.after_first(h.clone()), mlp(torch.cat(parts, dim=-1)))
    x = torch.randn(6, 9, requires_grad=True)  # the in-place ReLU keeps autograd intact
    mlp.after_first(mlp.layers[0](x)).sum().backward()
    y = x.detach().clone().requires_grad_(True)
    mlp(y).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    with pytest.raises(ValueError, match="do not split"):
        mlp.first_blocks([2, 3])
